"""The prose rule of `nla eval` (`prose_share`) on known examples and edge cases."""

from __future__ import annotations

import math

import pytest

from thoughtscope.nla.prose import is_prose, prose_failures, prose_share

TEMPLATE = 'Topic: cercetare, cercetare. Next: "." / ".". Context: "the sea". Token: island'
PROSE = "The text is a story about a sailor reaching an island at dawn."


def test_the_warm_start_template_is_not_prose_and_a_sentence_is():
    assert not is_prose(TEMPLATE)
    assert set(prose_failures(TEMPLATE)) >= {"field label", "word repeated back to back"}
    assert is_prose(PROSE) and prose_failures(PROSE) == []


@pytest.mark.parametrize(
    "text, broken",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("A story about a sailor. Token: island", "field label"),
        ("Next: the sailor reaches an island at dawn.", "field label"),
        ("the sailor reached an island", "no sentence of 4+ words"),  # no closing mark
        ("Sailor. Island. Dawn.", "no sentence of 4+ words"),  # sentences too short
        ("The 3 4 5 6 7 numbers are listed.", "under 70% alphabetic words"),
        ("See item 3 / 4 / 5 in the list.", "under 70% alphabetic words"),  # symbols count against
        ("The text is about carr, carr and boats.", "word repeated back to back"),
        ("The The text is about boats.", "word repeated back to back"),  # case is ignored
    ],
)
def test_each_rule_on_its_own(text, broken):
    assert broken in prose_failures(text) and not is_prose(text)


@pytest.mark.parametrize(
    "text",
    [
        "A sailor! At dawn he saw land, and it's a well-known island.",
        "Is this about a sailor at sea?",
        "Un marin atteint une île à l'aube.",  # letters of any script
        "The ratio: sales rose 3 percent this year.",  # a lowercase word before ':' is not a field label
        "The story is about the sea. Then more",  # one sentence of 4+ words is enough
    ],
)
def test_prose_that_passes(text):
    assert prose_failures(text) == [] and is_prose(text)


def test_prose_share():
    assert prose_share([PROSE, TEMPLATE, PROSE, "no"]) == 0.5
    assert prose_share([TEMPLATE]) == 0.0 and prose_share([PROSE]) == 1.0
    assert math.isnan(prose_share([]))
