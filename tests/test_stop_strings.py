"""Stop strings on text across token boundaries: never emitted, and only a possible stop is held back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from worker_orcd.stop_strings import StopMatcher


def _run(pieces: list[str], stops: list[str]) -> tuple[list[str], StopMatcher]:
    m = StopMatcher(stops)
    out = [m.push(p) for p in pieces]
    out.append(m.flush())
    return out, m


def test_stop_split_across_pieces_is_not_emitted() -> None:
    out, m = _run(["Hello, wo", "rl", "d! more"], ["world"])
    assert "".join(out) == "Hello, " and m.stopped == "world"
    assert out[0] == "Hello, "  # "wo" is held: it may become "world"


def test_held_text_released_when_it_cannot_become_a_stop() -> None:
    out, m = _run(["ab", "x", "c"], ["abc"])
    assert out == ["", "abx", "c", ""] and m.stopped is None


def test_earliest_stop_wins_and_flush_after_no_stop_releases_all() -> None:
    out, m = _run(["a<END>b<E"], ["b", "<END>"])
    assert "".join(out) == "a" and m.stopped == "<END>"
    out, m = _run(["tail <E"], ["<END>"])
    assert out == ["tail ", "<E"] and m.stopped is None


def test_a_longer_stop_starting_earlier_wins_over_a_shorter_one_inside_it() -> None:
    """Found by the property test below: on "<a" the stop "a" is complete, but "<a<" may start at 0."""
    out, m = _run(["<a", "<"], ["a", "<a<"])
    assert "".join(out) == "" and m.stopped == "<a<"
    out, m = _run(["<a", "b"], ["a", "<a<"])
    assert "".join(out) == "<" and m.stopped == "a"
    out, m = _run(["<a"], ["a", "<a<"])  # generation ends while "<a<" could still have formed
    assert "".join(out) == "<" and m.stopped == "a"


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc<>\n", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stops=st.lists(st.text(alphabet="abc<>\n", min_size=1, max_size=4), min_size=1, max_size=4))
def test_any_split_gives_the_text_before_the_first_stop(text: str, cuts: list[int], stops: list[str]) -> None:
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    out, m = _run(pieces, stops)
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
    assert "".join(out) == (text if first is None else text[:first])
    # never held more than a stop could still need: after each push, emitted + held == text so far
    released, fed = "", 0
    m2 = StopMatcher(stops)
    for p in pieces:
        released += m2.push(p)
        fed += len(p)
        if m2.stopped is None:
            assert len(released) >= fed - (max(map(len, stops)) - 1)
