"""Multi-turn episodes end to end through the sampler: tools, environments, masks, rewards, bad input.

Most tests drive the real decode loop (``multiturn``) with ``ScriptedLM``, a fake causal LM that puts all its
mass on the next token of each row's script, so every episode is known in advance; the KV-cache tests use a
real tiny GPT-2 (lean and HF decoders) and compare with a plain forward.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from transformers import PretrainedConfig

import episodes_for_tests as helpers
from rlhf_pg.models.builtin import char_tokenizer
from rlhf_pg.core.mdp import action_tokens
from rlhf_pg.episodes.spec import EpisodeSpec, environment_scores, episode_metrics, render_episode
from rlhf_pg.errors import RecipeError, UserError
from rlhf_pg.episodes.sampler import EpisodeSampler
from rlhf_pg.policy.logprobs import completion_logprobs
from rlhf_pg.policy.sampler import SamplingParams
from rlhf_pg.episodes.tools import CallFormat, bind_arguments, BadCall, call_tool, resolve_tools

TOKENIZER = char_tokenizer()
EOS = TOKENIZER.eos_token_id


def ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


class ScriptedLM(torch.nn.Module):
    """A causal LM (HF decoder path) that follows ``scripts[b]`` (token ids) for row b, then says EOS. It records
    which rows fed how many tokens in each forward (``calls``)."""

    def __init__(self, scripts: list[list[int]]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = PretrainedConfig()
        self.config.num_hidden_layers = 1
        self.generation_config = None
        self.scripts, self.histories, self.calls = scripts, None, []

    def forward(self, input_ids, attention_mask, **unused):
        width = input_ids.shape[1]
        new = attention_mask[:, -width:].bool()
        if self.histories is None:
            self.histories = [row[mask].tolist() for row, mask in zip(input_ids, new)]
            self.prompt_lengths = [len(h) for h in self.histories]
        else:
            for b in range(len(self.histories)):
                self.histories[b] += input_ids[b][new[b]].tolist()
            self.calls.append(new.sum(-1).tolist())
        logits = torch.full((input_ids.shape[0], 1, len(TOKENIZER)), -30.0)
        for b, history in enumerate(self.histories):
            done, script = history[self.prompt_lengths[b]:], self.scripts[b]
            on_script = done == script[: len(done)] and len(done) < len(script)
            logits[b, 0, script[len(done)] if on_script else EOS] = 30.0
        return SimpleNamespace(logits=logits)


def tool_spec(*tools, **limits) -> EpisodeSpec:
    return EpisodeSpec(tools={t.__name__: t for t in tools}, call_format=CallFormat.parse("[{name} {args}]"),
                       result_format="={result};", **{"max_turns": 4, "max_tool_errors": 3, "tool_timeout_s": 5.0,
                                                      **limits})


def run(spec, scripts, budget=60, prompts=None, extras=None):
    model = ScriptedLM([ids(s) if isinstance(s, str) else s for s in scripts])
    prompts = prompts or [f"{i}*2=" for i in range(len(scripts))]
    batch = EpisodeSampler(spec, model, TOKENIZER).sample(prompts, 1, SamplingParams(max_new_tokens=budget), columns=extras, generator=torch.Generator().manual_seed(0))
    return batch, model


# --- tools ----------------------------------------------------------------------------------------------


def test_a_tool_result_is_an_observation_outside_the_action_mask():
    batch, _ = run(tool_spec(helpers.echo), ["[echo 5]=ok5;done"])
    assert batch.completions == ["[echo 5]=ok5;done"] and bool(batch.finished[0])
    actions = batch.action_mask[0, : int(batch.completion_mask[0].sum())].tolist()
    assert actions == [1.0] * 8 + [0.0] * 5 + [1.0] * 5  # "[echo 5]" "=ok5;" "done" + EOS
    assert batch.logprobs[0][batch.action_mask[0] == 0].abs().sum() == 0  # observations carry no log-prob
    episode = batch.episodes[0]
    assert [t.role for t in episode.turns] == ["model", "tool", "model"] and episode.tool_calls == 1
    assert batch.extras["turns"][0][1] == {"role": "tool", "content": "=ok5;", "name": "echo"}
    assert episode_metrics(batch.episodes)["episode/tool_calls"] == 1.0
    assert "    [tool echo] =ok5;" in render_episode(episode).splitlines()


def test_unknown_tools_and_bad_arguments_become_observations_and_the_episode_goes_on():
    unknown = "=error: unknown tool 'nope' (tools: echo, two);"
    bad = "=error: two: bad arguments (missing a required argument: 'b');"
    batch, _ = run(tool_spec(helpers.echo, helpers.two), [f"[nope 1]{unknown}[two 1]{bad}[two 1, 2]=3;3"], budget=200)
    episode = batch.episodes[0]
    assert [t.text for t in episode.turns if t.role == "tool"] == [unknown, bad, "=3;"]
    assert episode.ended == "eos" and episode.tool_errors == 2 and episode.tool_calls == 3


def test_a_tool_that_raises_is_named_and_max_tool_errors_ends_the_episode_with_reward_0():
    error = "=error: ZeroDivisionError: division by zero;"
    batch, _ = run(tool_spec(helpers.boom, max_tool_errors=2), [f"[boom 1]{error}[boom 2]{error}7", "7"], budget=200)
    first, second = batch.episodes
    assert first.ended == "tool_errors" and first.tool_errors == 2 and not bool(batch.finished[0])
    assert batch.completions[0].endswith(error)  # the last error is in the log, nothing after it
    assert environment_scores(batch, [1.0, 1.0], {}) == [0.0, 1.0]
    assert episode_metrics(batch.episodes)["episode/ended_by_tool_errors"] == 1.0


def test_a_tool_that_hangs_times_out_and_the_episode_goes_on():
    started = time.monotonic()
    batch, _ = run(tool_spec(helpers.hangs, tool_timeout_s=0.3), ["[hangs 1]=error: hangs timed out after 0.3 s;x"])
    assert time.monotonic() - started < 5
    assert batch.completions == ["[hangs 1]=error: hangs timed out after 0.3 s;x"]
    assert batch.episodes[0].tool_errors == 1 and batch.episodes[0].ended == "eos"


def test_rows_waiting_for_a_slow_tool_do_not_stall_the_others():
    helpers.calls["sleepy"] = 0
    batch, model = run(tool_spec(helpers.sleepy), ["[sleepy 1]=late;ok", "a" * 40])
    assert batch.completions == ["[sleepy 1]=late;ok", "a" * 40] and helpers.calls["sleepy"] == 1
    observation_call = next(i for i, fed in enumerate(model.calls) if fed[0] > 1)  # the block with "=late;"
    last_of_other_row = max(i for i, fed in enumerate(model.calls) if fed[1] > 0)
    assert last_of_other_row < observation_call  # the other row finished while the tool ran
    assert max(fed[0] for fed in model.calls) == len("=late;")  # the observation: one block, one forward


def test_max_turns_and_the_token_budget_end_the_episode():
    batch, _ = run(tool_spec(helpers.echo, max_turns=2), ["[echo 1]=ok1;[echo 2]=ok2;x"])
    assert batch.episodes[0].ended == "max_turns" and batch.completions == ["[echo 1]=ok1;[echo 2]"]
    batch, _ = run(tool_spec(helpers.echo), ["[echo 1]=ok1;x"], budget=10)  # the result does not fit
    assert batch.episodes[0].ended == "budget" and batch.completions == ["[echo 1]=o"]
    assert int(batch.completion_mask.sum()) == 10 and not bool(batch.finished[0])


def test_the_call_rule_and_the_argument_rule():
    form = CallFormat.parse("<tool>{name}({args})</tool>")
    assert form.call_at_end("x<tool>f((1, 2))</tool>") == ("f", "(1, 2)")
    assert form.call_at_end("<tool>f(1)</tool") is None and form.call_at_end("f(1)</tool>") is None
    assert bind_arguments(helpers.two, "1, b=[2]") == ([1], {"b": [2]})
    assert bind_arguments(helpers.echo, "123*4") == (["123*4"], {})  # not literals, one parameter: the text
    with pytest.raises(BadCall, match="write Python literals"):
        bind_arguments(helpers.two, "1*2, 3")
    for bad in ("{name}({args})", "<t>{args}{name}</t>", "<t>{name}({args}"):
        with pytest.raises(RecipeError, match="rollout.tool_format"):
            CallFormat.parse(bad)
    assert call_tool({}, "x", "", 1.0).outcome() == (None, "unknown tool 'x' (tools: none)")


def test_a_tool_that_is_not_a_function_or_does_not_import_is_a_clear_error():
    with pytest.raises(UserError, match=r"tools\[0\]: 'episodes_for_tests:NOT_A_FUNCTION' is int .*not a function"):
        resolve_tools(["episodes_for_tests:NOT_A_FUNCTION"])
    with pytest.raises(UserError, match=r"tools\[1\]: cannot import module 'no_such_module'"):
        resolve_tools(["episodes_for_tests:echo", "no_such_module:f"])
    with pytest.raises(UserError, match="has no attribute 'missing'"):
        resolve_tools(["episodes_for_tests:missing"])


# --- environments ---------------------------------------------------------------------------------------


def env_spec(environment, **limits) -> EpisodeSpec:
    return EpisodeSpec(tools={}, environment=environment, **{"max_turns": 4, "tool_timeout_s": 5.0, **limits})


@pytest.mark.parametrize("environment", [helpers.CountingEnv, helpers.GymShapedEnv])
def test_an_environment_answers_each_turn_and_its_rewards_land_on_the_turn_that_earned_them(environment):
    helpers.CountingEnv.instances = 0
    script = ids("a") + [EOS] + ids("<a>") + ids("bc") + [EOS]
    batch, _ = run(env_spec(environment), [script, script], prompts=["p", "q"], extras={"answer": ["1", "2"]})
    assert helpers.CountingEnv.instances == 2  # one instance per episode
    assert batch.prompts == ["p go:", "q go:"]  # reset's observation is appended to the prompt
    assert batch.completions[0] == "a<a>bc" and batch.episodes[0].ended == "done"
    # "a" EOS | "<a>" | "bc" EOS: each turn's reward on the EOS that ended it
    assert batch.step_rewards[0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25]
    assert batch.action_mask[0].tolist() == [1, 1, 0, 0, 0, 1, 1, 1]
    scores = environment_scores(batch, [0.5, 0.5], per_reward := {})
    assert scores == [1.75, 1.75] and per_reward["environment"] == [1.25, 1.25]
    assert "[model reward=1] a" in render_episode(batch.episodes[0])


@pytest.mark.parametrize("environment,message", [
    (helpers.WrongShapeEnv, r"environment WrongShapeEnv: step\('a'\) returned 'no tuple here'; it must return"),
    (helpers.NonFiniteEnv, r"environment NonFiniteEnv: step\('a'\) returned the reward nan"),
    (helpers.RaisingEnv, r"environment RaisingEnv: step\('a'\) raised KeyError"),
])
def test_a_bad_environment_is_a_user_error_naming_the_class(environment, message):
    with pytest.raises(UserError, match=message):
        run(env_spec(environment), [ids("a") + [EOS]])


def test_an_environment_step_that_hangs_is_a_user_error_naming_the_class():
    with pytest.raises(UserError, match=r"environment SlowEnv: step\('a'\) did not return within "
                                        r"rollout.tool_timeout_s=0.2 s"):
        run(env_spec(helpers.SlowEnv, tool_timeout_s=0.2), [ids("a") + [EOS]])


def test_evaluation_reports_the_environment_reward_tool_calls_and_rendered_episodes():
    from rlhf_pg.evaluation import evaluate
    from rlhf_pg.recipe import RewardSpec
    from reward_models import RewardScorer

    script = ids("a") + [EOS] + ids("<a>") + ids("bc") + [EOS]
    model = ScriptedLM([script, script])
    result = evaluate(EpisodeSampler(env_spec(helpers.CountingEnv), model, TOKENIZER), model, ["p", "q"], {},
                      RewardScorer([RewardSpec(name="rewards_for_tests:sevens")]), SamplingParams(max_new_tokens=30))
    assert result["reward/environment"] == 1.25 and result["reward"] == 1.25 and result["tool_calls"] == 0.0
    assert result["examples"][0]["episode"].splitlines()[:2] == ["[model reward=1] a", "    [environment] <a>"]


def test_an_environment_class_must_have_reset_and_step():
    with pytest.raises(UserError, match="class NoStep has no step method"):
        EpisodeSpec.from_recipe(SimpleNamespace(tools=[], environment="episodes_for_tests:NoStep", rollout=None))
    with pytest.raises(UserError, match="is function, not a class"):
        EpisodeSpec.from_recipe(SimpleNamespace(tools=[], environment="episodes_for_tests:echo", rollout=None))


# --- the KV cache across turns (a real model) -----------------------------------------------------------


@pytest.fixture(scope="module")
def biased_model(tiny_model_dir):
    """The tiny GPT-2 with a head that likes '[', 'q', ']' and EOS: random calls, errors and observations."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data, head.bias.data = model.lm_head.weight.data.clone(), torch.zeros(model.lm_head.out_features)
    for char, bias in (("[", 3.0), ("q", 3.0), ("]", 3.0), (" ", 1.0)):
        head.bias.data[TOKENIZER.convert_tokens_to_ids(char)] = bias
    head.bias.data[EOS] = 1.0
    model.lm_head = head
    return model


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("lean", [True, False])
def test_sampled_logprobs_equal_a_plain_forward_over_the_whole_episode(biased_model, lean, prefix, monkeypatch):
    """Also with prompts that share a prefix (prefilled once for all: ``builtin.prefill_prompts``)."""
    import rlhf_pg.policy.builtin as builtin

    original = builtin.make_decoder
    monkeypatch.setattr(builtin, "make_decoder",
                        lambda model, b, n, lean=True, rows=None: original(model, b, n, lean=lean_, rows=rows))
    lean_ = lean
    spec = tool_spec(helpers.echo)
    spec.tools = {"q": helpers.echo}  # a name the biased head writes often
    prompts = ["12*3=", "7*8=", "1*1="]
    if prefix:
        prompts = ["Compute this: " + p for p in prompts]
        embedded = []
        hook = biased_model.get_input_embeddings().register_forward_pre_hook(lambda m, a: embedded.append(a[0].shape))
    try:
        batch = EpisodeSampler(spec, biased_model, TOKENIZER, max_context=64).sample(
            prompts, 4, SamplingParams(max_new_tokens=40), columns=None, generator=torch.Generator().manual_seed(1))
    finally:
        if prefix:
            hook.remove()
    if prefix:  # the first forward is the prefix (its 14 characters, after the tokenizer's own start), once
        assert embedded[0] == (1, len(TOKENIZER("Compute this: ")["input_ids"])) and embedded[0][1] >= 14
    else:
        observations = batch.completion_mask * (1 - batch.action_mask)
        assert observations.sum() > 20 and len({int(n) for n in observations.sum(-1)}) > 1  # blocks of several sizes
    recomputed = completion_logprobs(biased_model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                     batch.completion_mask)
    assert torch.allclose(recomputed * action_tokens(batch), batch.logprobs, atol=1e-5)


def test_decoder_extend_equals_a_plain_forward_with_uneven_blocks(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rlhf_pg.policy.decoder import make_decoder

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt, prompt_mask = torch.randint(4, 60, (3, 4), generator=torch.Generator().manual_seed(0)), torch.ones(3, 4)
    prompt_mask[0, :2] = 0
    blocks = [[[10, 11, 12], [20], []], [[13], [21, 22], [30]], [[14], [], []]]
    for lean in (True, False):
        decoder = make_decoder(model, 3, 5, lean=lean)  # fewer slots than the blocks use: the cache grows
        with torch.inference_mode():
            decoder.prefill(prompt, prompt_mask)
            last = [None] * 3
            for block in blocks:
                width = max(len(row) for row in block)
                tokens, valid = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.bool)
                for b, row in enumerate(block):
                    if row:
                        tokens[b, width - len(row):], valid[b, width - len(row):] = torch.tensor(row), True
                logits = decoder.extend(tokens, valid)
                last = [logits[b] if block[b] else last[b] for b in range(3)]
            for b, fed in enumerate(([10, 11, 12, 13, 14], [20, 21, 22], [30])):
                sequence = torch.cat([prompt[b][prompt_mask[b] > 0], torch.tensor(fed)])[None]
                assert torch.allclose(last[b], model(input_ids=sequence).logits[0, -1], atol=1e-5), (lean, b)
