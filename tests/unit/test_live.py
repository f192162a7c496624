"""The pieces of a live rotation that need no database: the policy, the
query value pairs, the throttle's arguments, the MariaDB batch statement."""

from __future__ import annotations

import pytest

from sa_envelope import LivePolicy
from sa_envelope.columns.livematch import Sealed
from sa_envelope.jobs.batchwrite import _mysql_sql
from sa_envelope.jobs.threads import run_workers
from sa_envelope.jobs.throttle import Throttle


@pytest.mark.parametrize("ttl, grace", [(0, 1), (5, 5), (10, 1), (-1, 3)])
def test_live_policy_needs_ttl_below_grace(ttl: float, grace: float) -> None:
    with pytest.raises(ValueError, match="ttl < grace"):
        LivePolicy(ttl=ttl, grace=grace)


def test_live_policy_defaults() -> None:
    policy = LivePolicy()
    assert (policy.ttl, policy.grace) == (5.0, 60.0)


def test_sealed_never_shows_its_value() -> None:
    assert "secret-value" not in repr(Sealed("secret-value", None))


def test_throttle_refuses_a_rate_that_is_not_positive() -> None:
    with pytest.raises(ValueError):
        Throttle(0)


def test_mysql_batch_statement_has_one_row_per_value() -> None:
    sql = _mysql_sql("`people`", ("`id`",), "`ssn`", 3)
    assert sql.count("UNION ALL") == 2
    assert sql.count("%s") == 9
    assert sql.startswith("UPDATE `people` AS t JOIN (SELECT %s AS k0, %s AS old, %s AS new")
    assert sql.endswith("ON t.`id` = v.k0 AND t.`ssn` = v.old SET t.`ssn` = v.new")


def test_workers_reraise_the_first_failure() -> None:
    done: list[int] = []

    def work(i: int) -> None:
        if i == 1:
            raise RuntimeError("worker 1 failed")
        done.append(i)

    with pytest.raises(RuntimeError, match="worker 1"):
        run_workers(3, work)
    assert sorted(done) == [0, 2]
    with pytest.raises(ValueError):
        run_workers(0, work)
