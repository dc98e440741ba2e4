"""Tier configuration: composition with +, parsing, and errors that name the field."""

import tomllib

import pytest

from dmlsys.events.tiers import (ANONYMOUS, HOUR, SECOND, Concurrency, Policy, Queue, Rate, Tier, TierError,
                                 tiers_from_config)


def test_pieces_compose_rates_accumulate_and_the_right_hand_piece_wins():
    p = Rate(100, SECOND) + Rate(5000, HOUR) + Concurrency(3) + Queue(8)
    assert p.rates == (Rate(100, SECOND), Rate(5000, HOUR))
    assert (p + Concurrency(5)).concurrency == Concurrency(5)
    assert (p + Rate(100, SECOND)).rates == p.rates  # the same rate twice counts once
    assert (p + Policy()).queue == Queue(8)  # an empty policy's defaults erase nothing
    assert (ANONYMOUS.policy + Queue(0)).rates == ANONYMOUS.policy.rates


@pytest.mark.parametrize("text, limit, period", [("100/s", 100, 1.0), ("1/hour", 1, 3600.0), ("30/5min", 30, 300.0),
                                                 ("7 / day", 7, 86400.0), ("2/0.5s", 2, 0.5)])
def test_rates_parse_from_text(text, limit, period):
    assert Rate.parse(text) == Rate(limit, period)


def test_a_toml_file_gives_validated_tiers():
    doc = tomllib.loads("""
        [tiers.anonymous]
        rates = ["1/hour"]
        concurrency = 2
        queue = 16
        [tiers.gold]
        rates = [{limit = 100, period = 1}, "5000/hour"]
        concurrency = 3
        total_concurrency = 12
        max_wait = 5
        max_principals = 50
    """)
    tiers = tiers_from_config(doc)
    assert tiers["anonymous"].policy == Rate(1, HOUR) + Concurrency(2) + Queue(16)
    gold = tiers["gold"].policy
    assert gold.concurrency == Concurrency(3, 12) and gold.queue.max_wait == 5 and gold.principals.max == 50


@pytest.mark.parametrize("table, where", [
    ({"rates": ["lots"]}, "tiers.x.rates[0]"),
    ({"rates": [{"limit": 1}]}, "tiers.x.rates[0]"),
    ({"rates": [{"limit": 1, "period": 1, "burst": 2}]}, "tiers.x.rates[0]: unknown field"),
    ({"rates": "1/s"}, "tiers.x.rates must be a list"),
    ({"concurrency": 0}, "tiers.x.concurrency"),
    ({"total_concurrency": 1.5}, "tiers.x.total_concurrency"),
    ({"queue": -1}, "tiers.x.queue"),
    ({"max_wait": 0}, "tiers.x.max_wait"),
    ({"max_principals": True}, "tiers.x.max_principals"),
    ({"concurency": 2}, "unknown field(s) concurency"),
])
def test_each_bad_field_is_named_in_the_error(table, where):
    with pytest.raises(TierError) as e:
        tiers_from_config({"tiers": {"x": table}})
    assert where in str(e.value)


def test_tier_names_are_checked():
    with pytest.raises(TierError, match="Tier.name"):
        Tier("no spaces allowed")
    with pytest.raises(TierError, match="resolution"):
        Rate(1, 1.0, resolution=2.0)
