"""localseek.session: the KV cache kept between requests, reused for the longest common prefix,
and the oldest chat turns dropped when a conversation outgrows the context."""

from __future__ import annotations

import numpy as np
import pytest

import localseek
from localseek.errors import LocalseekError
from localseek.session import Session, common_prefix, fit_chat


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from localseek.demo import build_tiny_model

    return localseek.load(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"), ctx=256)


@pytest.fixture
def forwards(model, monkeypatch):
    """(start, tokens) of every forward the model runs."""
    calls: list[tuple[int, int]] = []
    forward = model.forward

    def spy(tokens, start, cache, *args, **kwargs):
        calls.append((start, tokens.shape[1]))
        return forward(tokens, start, cache, *args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    return calls


def fresh_last_logits(model, ids: list[int]) -> np.ndarray:
    """The last position's logits of one full prefill of ``ids`` into an empty cache."""
    return model.logits(ids)[-1]


def assert_same_logits(got, want) -> None:
    # the reused keys were computed in other batches (the first turn's prefill, its decode
    # steps) than a full prefill computes them in: equal up to float32 rounding, not bit-equal
    got = got.cpu().numpy() if hasattr(got, "cpu") else got
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert got.argmax() == want.argmax()


def chat_ids(model, messages):
    return model.tokenizer.apply_chat_template(messages)


def test_second_chat_turn_prefills_only_the_new_tokens(model, forwards):
    session = Session(model)
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the sea"}]
    ids1 = chat_ids(model, first)
    gen = session.generate(ids1, 12)
    answer = list(gen)
    assert gen.stats.reused_tokens == 0 and gen.stats.prefilled_tokens == len(ids1)
    assert forwards[0] == (0, len(ids1))
    # the cache holds the prompt and every generated token fed back (not the last one)
    assert session.tokens == ids1 + answer[:-1]

    # the next request is the whole conversation: what is cached plus the new turn's tokens
    new = model.tokenizer.encode("<｜User｜>and the wind<｜Assistant｜>", add_bos=False)
    ids2 = session.tokens + [answer[-1]] + new
    forwards.clear()
    logits, reused = session.prefill(ids2)
    assert reused == len(ids1) + len(answer) - 1
    assert forwards == [(reused, len(ids2) - reused)]  # one forward, of the new tokens only
    assert_same_logits(logits, fresh_last_logits(model, ids2))
    assert session.tokens == ids2

    # through generate: the same reuse in the stats, and the same greedy answer as from scratch
    session.tokens[:] = ids2[:reused]
    gen = session.generate(ids2, 8)
    assert list(gen) == list(model.generate(ids2, 8))
    assert gen.stats.reused_tokens == reused
    assert gen.stats.prefilled_tokens == len(ids2) - reused


def test_second_turn_through_the_chat_template(model):
    """The chat re-renders the conversation: the first prompt is always reused, the answer as
    far as its text tokenizes back to the tokens the model generated."""
    session = Session(model)
    history = [{"role": "user", "content": "the sea was calm"}]
    ids1 = chat_ids(model, history)
    answer = list(session.generate(ids1, 10))
    history += [
        {"role": "assistant", "content": model.tokenizer.decode(answer, skip_special_tokens=True)},
        {"role": "user", "content": "and then?"},
    ]
    ids2 = chat_ids(model, history)
    expected = common_prefix(ids1 + answer[:-1], ids2)
    assert expected >= len(ids1)
    gen = session.generate(ids2, 6)
    tokens = list(gen)
    assert gen.stats.reused_tokens == expected
    assert tokens == list(model.generate(ids2, 6))


def test_divergent_prefix_truncates_to_the_common_part(model, forwards):
    session = Session(model)
    rng = np.random.RandomState(0)
    shared = [int(t) for t in rng.randint(4, 500, size=20)]
    a = shared + [int(t) for t in rng.randint(4, 500, size=15)]
    b = shared + [int(t) for t in rng.randint(4, 500, size=9)]
    assert a[20] != b[20]
    session.prefill(a)
    forwards.clear()
    logits, reused = session.prefill(b)
    assert reused == 20
    assert forwards == [(20, len(b) - 20)]
    assert session.tokens == b  # the cache's positions past the common prefix now hold b's
    assert_same_logits(logits, fresh_last_logits(model, b))
    # back to a: the common prefix is the shared part again, and a's tail is recomputed
    logits, reused = session.prefill(a)
    assert reused == 20
    assert_same_logits(logits, fresh_last_logits(model, a))
    # a prefix of what is cached: its last token is computed again for its logits
    forwards.clear()
    logits, reused = session.prefill(a[:30])
    assert (reused, forwards) == (29, [(29, 1)])
    assert_same_logits(logits, fresh_last_logits(model, a[:30]))
    assert session.tokens == a[:30]
    # after reset nothing is reused
    session.reset()
    assert session.prefill(b)[1] == 0


def test_interrupted_prefill_keeps_the_cache_consistent(model, monkeypatch):
    session = Session(model)
    rng = np.random.RandomState(1)
    a = [int(t) for t in rng.randint(4, 500, size=30)]
    session.prefill(a)
    forward = model.forward

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "forward", interrupt)
    with pytest.raises(KeyboardInterrupt):
        session.prefill(a[:12] + [7, 8, 9])
    assert session.tokens == a[:12]  # what the cache still holds for sure
    monkeypatch.setattr(model, "forward", forward)
    logits, reused = session.prefill(a[:12] + [7, 8, 9])
    assert reused == 12
    assert_same_logits(logits, fresh_last_logits(model, a[:12] + [7, 8, 9]))


def test_fit_chat_drops_the_oldest_turns_and_keeps_the_system_prompt(model):
    tok = model.tokenizer
    system = {"role": "system", "content": "You answer in one line."}
    turns = []
    for i in range(4):
        turns.append({"role": "user", "content": f"question {i} about the old sailor"})
        turns.append({"role": "assistant", "content": f"answer {i} about the calm sea"})
    turns.append({"role": "user", "content": "the last question"})
    whole = tok.apply_chat_template([system, *turns])
    ids, dropped = fit_chat(tok, [system, *turns], len(whole))
    assert (ids, dropped) == (whole, 0)
    # one token short: the oldest exchange (a user message and its answer) goes
    ids, dropped = fit_chat(tok, [system, *turns], len(whole) - 1)
    assert dropped == 2
    assert ids == tok.apply_chat_template([system, *turns[2:]])
    # only the system prompt and the last question fit
    last = tok.apply_chat_template([system, turns[-1]])
    ids, dropped = fit_chat(tok, [system, *turns], len(last))
    assert (ids, dropped) == (last, 8)
    with pytest.raises(LocalseekError, match=r"the system prompt and this message take \d+ tokens"):
        fit_chat(tok, [system, *turns], len(last) - 1)


def test_a_replaced_generation_fails_instead_of_reading_the_new_prompts_keys(model):
    session = Session(model)
    a, b = list(range(5, 25)), list(range(40, 70))
    first = session.generate(a, 8)
    next(first)
    second = session.generate(b, 6)
    got = [next(second)]
    with pytest.raises(LocalseekError, match="has started another generation since"):
        next(first)
    got += list(second)  # the newer one goes on, with its own tokens only
    assert got == list(model.generate(b, 6))


def test_a_step_from_another_thread_is_refused(model, monkeypatch):
    import threading

    session = Session(model)
    entered, release = threading.Event(), threading.Event()
    forward = model.forward

    def slow(*args, **kwargs):
        entered.set()
        release.wait(30)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow)
    worker = threading.Thread(target=session.prefill, args=(list(range(5, 25)),))
    worker.start()
    try:
        assert entered.wait(30)
        with pytest.raises(LocalseekError, match="running a step of another generation"):
            session.prefill(list(range(40, 70)))
    finally:
        release.set()
        worker.join()
    assert session.tokens == list(range(5, 25))
