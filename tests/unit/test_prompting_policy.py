"""Pure domain of the conversation: prompt assembly, the dual-context policy, summary records."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxcore.core.domain.dual_context import (
    MAX_WARMUP_RETRY_WAIT_TURNS,
    DualContextAction,
    DualContextPolicy,
    StandbyState,
    oldest_turns_to_drop,
    select_recent,
    standby_history,
    warmup_retry_turn,
)
from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.models import ConversationMessage, Role
from voxcore.core.domain.prompting import (
    SUMMARY_HEADING,
    Prompts,
    assemble_prompt,
    summary_request,
    transcript,
)
from voxcore.core.domain.summary import (
    RECORDS_KEPT,
    SummaryRecord,
    decode_records,
    encode_records,
    find_covering,
    history_digest,
    remember,
)

PROMPTS = Prompts(
    system_prompt="Ты ассистент.\n",
    response_format_instruction="  Ответь JSON.",
    summarization_prompt="Перескажи.",
)


def msg(role: Role, content: str) -> ConversationMessage:
    return ConversationMessage(role=role, content=content)


def dialogue(*contents: str) -> list[ConversationMessage]:
    """Alternating user/assistant messages, starting with the user."""
    roles: tuple[Role, Role] = ("user", "assistant")
    return [msg(roles[i % 2], text) for i, text in enumerate(contents)]


messages_st = st.lists(
    st.builds(msg, st.sampled_from(["user", "assistant", "system"]), st.text(max_size=30)), max_size=12
)


# -- prompts -------------------------------------------------------------------------------------------


def test_prompts_are_stripped_once() -> None:
    assert PROMPTS.system_prompt == "Ты ассистент."
    assert PROMPTS.response_format_instruction == "Ответь JSON."


@pytest.mark.parametrize("bad", ["", "   \n", None, 5])
def test_prompts_refuse_blank_or_non_text(bad: object) -> None:
    with pytest.raises(DomainError, match="system_prompt"):
        Prompts(system_prompt=bad, response_format_instruction="f", summarization_prompt="s")  # type: ignore[arg-type]


def test_prompts_from_mapping() -> None:
    data = {"system_prompt": "a", "response_format_instruction": "b", "summarization_prompt": "c"}
    assert Prompts.from_mapping(data) == Prompts("a", "b", "c")
    with pytest.raises(DomainError, match="unknown prompt keys: extra"):
        Prompts.from_mapping({**data, "extra": "x"})
    with pytest.raises(DomainError, match="missing prompt keys: summarization_prompt"):
        Prompts.from_mapping({"system_prompt": "a", "response_format_instruction": "b"})
    with pytest.raises(DomainError, match="mapping"):
        Prompts.from_mapping(["a"])


def test_assemble_prompt_order_system_history_format() -> None:
    history = dialogue("Привет", "Здравствуйте")
    prompt = assemble_prompt(PROMPTS, history)
    assert prompt == [
        msg("system", "Ты ассистент."),
        msg("user", "Привет"),
        msg("assistant", "Здравствуйте"),
        msg("system", "Ответь JSON."),
    ]
    assert history == dialogue("Привет", "Здравствуйте")  # input untouched


def test_assemble_prompt_puts_summary_into_the_system_message() -> None:
    prompt = assemble_prompt(PROMPTS, [], summary=" Клиент Иван, полис 42. ")
    assert prompt[0] == msg("system", f"Ты ассистент.\n\n{SUMMARY_HEADING}Клиент Иван, полис 42.")
    assert prompt[-1] == msg("system", "Ответь JSON.")
    assert assemble_prompt(PROMPTS, [], summary="  ")[0] == msg("system", "Ты ассистент.")


@given(messages_st, st.none() | st.text(max_size=20))
def test_assemble_prompt_is_history_framed_by_two_system_messages(
    history: list[ConversationMessage], summary: str | None
) -> None:
    prompt = assemble_prompt(PROMPTS, history, summary=summary)
    assert prompt[1:-1] == history
    assert prompt[0]["role"] == prompt[-1]["role"] == "system"


def test_summary_request_is_prompt_plus_transcript() -> None:
    request = summary_request(PROMPTS, dialogue("Мой полис 42", "Нашёл его"), previous_summary="Звонит Иван.")
    assert request[0] == msg("system", "Перескажи.")
    assert request[1] == msg(
        "user", f"{SUMMARY_HEADING}Звонит Иван.\n\nКлиент: Мой полис 42\nАссистент: Нашёл его"
    )
    assert transcript([msg("system", "x")]) == "Система: x"


# -- policy ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("warmup", "handover", "hard"),
    [
        (0.0, 0.5, 0.9),
        (0.5, 0.5, 0.9),
        (0.6, 0.5, 0.9),
        (0.5, 0.95, 0.9),
        (0.5, 0.8, 1.2),
        (float("nan"), 0.8, 0.9),
    ],
)
def test_policy_refuses_unordered_thresholds(warmup: float, handover: float, hard: float) -> None:
    with pytest.raises(DomainError):
        DualContextPolicy(warmup, handover, hard)


def test_policy_defaults_and_trim_target() -> None:
    policy = DualContextPolicy()
    assert (policy.warmup_threshold_ratio, policy.handover_threshold_ratio, policy.hard_limit_ratio) == (
        0.6,
        0.8,
        0.95,
    )
    assert policy.trim_target == pytest.approx(0.775)
    assert DualContextPolicy(0.5, 0.9, 0.9).handover_threshold_ratio == 0.9  # handover == hard is allowed
    assert DualContextPolicy(trim_target_ratio=0.5).trim_target == 0.5
    with pytest.raises(DomainError, match="trim_target_ratio"):
        DualContextPolicy(trim_target_ratio=0.95)


POLICY = DualContextPolicy(0.6, 0.8, 0.95)
NONE, WARMING, READY = StandbyState.NONE, StandbyState.WARMING, StandbyState.READY
A = DualContextAction


@pytest.mark.parametrize(
    ("ratio", "standby", "boundary", "expected"),
    [
        (0.1, NONE, True, A.NONE),
        (0.6, NONE, False, A.START_WARMUP),
        (0.7, WARMING, True, A.NONE),
        (0.85, WARMING, True, A.NONE),
        (0.85, READY, False, A.NONE),  # ready, but mid-turn: wait for the boundary
        (0.85, READY, True, A.HANDOVER),
        (0.7, READY, True, A.NONE),  # ready, below the handover threshold
        (0.95, READY, False, A.HANDOVER),  # hard limit: hand over now rather than trim
        (0.96, WARMING, False, A.TRIM),
        (0.99, NONE, False, A.START_WARMUP),  # snapshot first, trim on the next decision
    ],
)
def test_decide_table(
    ratio: float, standby: StandbyState, boundary: bool, expected: DualContextAction
) -> None:
    assert POLICY.decide(ratio, standby, turn_boundary=boundary) is expected


def test_decide_respects_retry_wait_and_useless_standby() -> None:
    assert POLICY.decide(0.7, NONE, turn_boundary=True, warmup_allowed=False) is A.NONE
    assert POLICY.decide(0.97, NONE, turn_boundary=True, warmup_allowed=False) is A.TRIM
    # A standby that would not be smaller than the active context is stale: replaced at a boundary.
    assert POLICY.decide(0.85, READY, turn_boundary=True, standby_ratio=0.9) is A.START_WARMUP
    assert POLICY.decide(0.85, READY, turn_boundary=False, standby_ratio=0.9) is A.NONE
    assert POLICY.decide(0.85, READY, turn_boundary=True, standby_ratio=0.9, warmup_allowed=False) is A.NONE
    assert POLICY.decide(0.97, READY, turn_boundary=False, standby_ratio=0.97) is A.TRIM
    assert POLICY.decide(0.85, READY, turn_boundary=True, standby_ratio=0.3) is A.HANDOVER
    with pytest.raises(DomainError):
        POLICY.decide(float("nan"), NONE, turn_boundary=True)


thresholds_st = (
    st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
    .map(sorted)
    .filter(lambda t: t[0] < t[1])
)


@given(
    thresholds_st,
    st.floats(0.0, 2.0),
    st.sampled_from(list(StandbyState)),
    st.booleans(),
    st.booleans(),
    st.none() | st.floats(0.0, 2.0),
)
def test_decide_properties(
    thresholds: list[float],
    ratio: float,
    standby: StandbyState,
    boundary: bool,
    allowed: bool,
    standby_ratio: float | None,
) -> None:
    policy = DualContextPolicy(*thresholds)
    action = policy.decide(
        ratio, standby, turn_boundary=boundary, warmup_allowed=allowed, standby_ratio=standby_ratio
    )
    if action is A.HANDOVER:
        assert standby is READY and ratio >= policy.handover_threshold_ratio
        assert boundary or ratio >= policy.hard_limit_ratio
        assert standby_ratio is None or standby_ratio < ratio
    if action is A.START_WARMUP:
        assert allowed and ratio >= policy.warmup_threshold_ratio
        stale = boundary and ratio >= policy.handover_threshold_ratio and standby_ratio is not None
        assert standby is NONE or (
            standby is READY and stale and standby_ratio is not None and standby_ratio >= ratio
        )
    if action is A.TRIM:
        assert ratio >= policy.hard_limit_ratio
    if ratio < policy.warmup_threshold_ratio:
        assert action is A.NONE
    # The active context never stays above the hard limit without something being done.
    if ratio >= policy.hard_limit_ratio:
        assert action is not A.NONE
    # A ready, smaller standby always takes over at a boundary once the threshold is reached.
    if standby is READY and boundary and ratio >= policy.handover_threshold_ratio and standby_ratio is None:
        assert action is A.HANDOVER


def test_warmup_retry_waits_longer_after_each_failure() -> None:
    assert [warmup_retry_turn(10, n) for n in range(0, 7)] == [10, 11, 12, 14, 18, 18, 18]
    assert warmup_retry_turn(3, 100) == 3 + MAX_WARMUP_RETRY_WAIT_TURNS


# -- standby history and trimming ---------------------------------------------------------------------------


def test_select_recent_starts_at_a_user_message() -> None:
    history = dialogue("u1", "a1", "u2", "a2", "u3")
    assert select_recent(history, 3) == dialogue("u2", "a2", "u3")
    assert select_recent(history, 2) == [msg("user", "u3")]  # the orphan reply a2 is left to the summary
    assert select_recent(history, 0) == []
    assert select_recent(history, 50) == history
    assert select_recent([msg("assistant", "a")], 5) == []
    with pytest.raises(DomainError):
        select_recent(history, -1)


def test_standby_history_is_recent_snapshot_then_everything_added_since() -> None:
    snapshot = dialogue("u1", "a1", "u2", "a2")
    added = dialogue("u3", "a3")
    assert standby_history(snapshot, recent=2, added_since_snapshot=added) == dialogue("u2", "a2", "u3", "a3")
    assert standby_history(snapshot, recent=0) == []


def test_oldest_turns_to_drop_whole_turns_and_keeps_the_last() -> None:
    roles: list[Role] = ["user", "assistant", "user", "assistant", "user"]
    counts = [10, 10, 10, 10, 10]
    assert oldest_turns_to_drop(roles, counts, 0) == 0
    assert oldest_turns_to_drop(roles, counts, 1) == 2  # a whole turn, never half of one
    assert oldest_turns_to_drop(roles, counts, 21) == 4
    assert oldest_turns_to_drop(roles, counts, 1000) == 4  # the newest turn is kept
    assert oldest_turns_to_drop(roles, counts, 1000, keep_last_turn=False) == 5
    assert oldest_turns_to_drop(["assistant", "user"], [5, 5], 1) == 1  # a leading orphan is a turn
    with pytest.raises(DomainError):
        oldest_turns_to_drop(roles, [1], 5)


@given(st.lists(st.sampled_from(["user", "assistant"]), max_size=15), st.integers(-5, 200))
def test_oldest_turns_to_drop_properties(roles: list[Role], excess: int) -> None:
    counts = [7] * len(roles)
    dropped = oldest_turns_to_drop(roles, counts, excess)
    assert 0 <= dropped <= len(roles)
    if dropped:
        assert dropped < len(roles) and roles[dropped] == "user"  # the remainder starts a turn
    last_user = max((i for i, role in enumerate(roles) if role == "user" and i > 0), default=None)
    if excess > 0 and sum(counts[:dropped]) < excess:
        assert dropped == (last_user or 0)  # could only stop early by reaching the newest turn


# -- summary records ---------------------------------------------------------------------------------------


def test_history_digest_is_canonical_and_order_sensitive() -> None:
    history = dialogue("Привет", "Здравствуйте")
    digest = history_digest(history)
    assert len(digest) == 64 and digest == history_digest(dialogue("Привет", "Здравствуйте"))
    with_extra: list[Any] = [{**m, "extra": 1} for m in history]
    assert digest == history_digest(with_extra)
    assert digest != history_digest(list(reversed(history)))
    assert digest != history_digest(dialogue("Привет", "Здравствуйте!"))
    assert history_digest([msg("user", "\ud800")])  # lone surrogates encode
    # Pinned: the digest must be equal across processes and versions, or caches go cold.
    expected = json.dumps([{"content": "a", "role": "user"}], separators=(",", ":"))
    import hashlib

    assert history_digest([msg("user", "a")]) == hashlib.sha256(expected.encode()).hexdigest()


def record(summary: str = "Клиент Иван.", covers: int = 4, digest: str = "a" * 64) -> SummaryRecord:
    return SummaryRecord(summary=summary, covers_messages=covers, digest=digest, model="gpt-test")


@given(st.text(min_size=1).filter(str.strip), st.integers(0, 10**6), st.text(max_size=10))
def test_summary_record_round_trip(summary: str, covers: int, model: str) -> None:
    original = SummaryRecord(summary, covers, history_digest([msg("user", summary)]), model)
    assert SummaryRecord.decode(original.encode()) == original
    assert SummaryRecord.decode(original.encode().encode("utf-8")) == original
    assert decode_records(original.encode()) == (original,)


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "not json",
        "[]",
        "{}",
        '{"v": 2, "summary": "s", "covers_messages": 1, "digest": "' + "a" * 64 + '", "model": "m"}',
        '{"v": 1, "summary": "", "covers_messages": 1, "digest": "' + "a" * 64 + '", "model": "m"}',
        '{"v": 1, "summary": "s", "covers_messages": -1, "digest": "' + "a" * 64 + '", "model": "m"}',
        '{"v": 1, "summary": "s", "covers_messages": true, "digest": "' + "a" * 64 + '", "model": "m"}',
        '{"v": 1, "summary": "s", "covers_messages": 1, "digest": "xyz", "model": "m"}',
        '{"v": 1, "summary": "s", "covers_messages": 1, "digest": "' + "a" * 64 + '"}',
        '{"v": 1, "summary": "s", "covers_messages": 1, "digest": "' + "a" * 64 + '", "model": "m", "x": 1}',
        "[" * 100_000,
        b"\xff\xfe",
    ],
)
def test_summary_record_decode_refuses_malformed(text: object) -> None:
    assert SummaryRecord.decode(text) is None
    assert decode_records(text) == ()


@given(st.text())
def test_decode_never_raises(text: str) -> None:
    SummaryRecord.decode(text)
    decode_records(text)


def test_summary_record_validates() -> None:
    with pytest.raises(DomainError):
        record(summary=" ")
    with pytest.raises(DomainError):
        record(covers=-1)
    with pytest.raises(DomainError):
        record(digest="A" * 64)


def test_records_list_round_trip_cover_and_remember() -> None:
    first, second = record("один", 2, "1" * 64), record("два", 4, "2" * 64)
    value = encode_records([first, second])
    assert decode_records(value) == (first, second)
    assert find_covering((first, second), digest="2" * 64, messages=4) is second
    assert find_covering((first, second), digest="2" * 64, messages=5) is None  # same digest, other history
    assert find_covering((first, second), digest="3" * 64, messages=4) is None
    # A malformed item is skipped, the rest survive.
    data = json.loads(value)
    data["records"].insert(0, {"v": 1, "summary": 5})
    assert decode_records(json.dumps(data)) == (first, second)
    # remember: newest last, same coverage replaced, bounded.
    newer = record("два, заново", 4, "2" * 64)
    assert remember((first, second), newer) == (first, newer)
    many: tuple[SummaryRecord, ...] = ()
    for index in range(RECORDS_KEPT + 3):
        many = remember(many, record(f"s{index}", index, f"{index:064x}"))
    assert len(many) == RECORDS_KEPT and many[-1].summary == f"s{RECORDS_KEPT + 2}"
    with pytest.raises(DomainError):
        remember(many, first, keep=0)
