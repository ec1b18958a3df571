"""
A pool member's state has one owner per part: its connection count moves
only through the L{lbws.backends.pool.Connection} that L{lbws.backends.pool.Member.opened}
returns, so every exit path may close it and none can leak a count; the
other modules read the member, they cannot write it.
"""

import pytest

from lbws.backends.pool import Member
from tests.test_balance import settingsFor


def member():
    return Member(settingsFor([("a", "ws://127.0.0.1:1")]).backend("a"))


def test_a_connection_counts_once_however_often_it_is_closed():
    m = member()
    first, second = m.opened(), m.opened()
    assert (m.active, m.total) == (2, 0)
    first.established()
    first.established()
    assert m.total == 1
    first.close()
    first.close()
    assert m.active == 1
    second.close()
    second.established()  # too late: a closed connection is not counted
    assert (m.active, m.total) == (0, 1)


@pytest.mark.parametrize(
    "field",
    [
        "active",
        "total",
        "failed",
        "healthy",
        "drained",
        "removed",
        "lastError",
        "changed",
        "settings",
        "health",
        "admin",
        "traffic",
    ],
)
def test_other_modules_cannot_write_a_members_fields(field):
    m = member()
    with pytest.raises(AttributeError):
        setattr(m, field, 1)


def test_each_owner_changes_its_own_part():
    m = member()
    assert m.recordCheck(False, 1.0, rise=1, fall=1, error="refused")
    assert (m.state, m.lastError, m.changed) == ("down", "refused", 1.0)
    m.admin.drain()
    assert m.state == "draining"
    m.admin.drain(False)
    m.health.follow(True, 2.0)
    assert (m.state, m.changed) == ("up", 2.0)
    m.traffic.message(True, 10)
    m.traffic.message(False, 3)
    m.traffic.report(1, {"messagesIn": 5, "active": 2})
    assert (m.count("messagesIn"), m.count("messagesOut"), m.count("active")) == (6, 1, 2)
    m.traffic.forget(1)
    assert m.count("active") == 0
