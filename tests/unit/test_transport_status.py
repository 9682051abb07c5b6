"""`transport.status()`: whether the fast path is on and why not, as the startup line and `doctor` show it.
`doctor` gives it as a finding: ok when on, a note (not a problem: asyncssh as shipped is slower, not wrong)
when off, with the reason and what to change."""

from __future__ import annotations

import pytest

from bastion import transport
from bastion.ops.doctor import NOTE, OK, summary, transport_finding


def test_status_describes_on_and_off_with_the_reason():
    off = transport.TransportStatus(False, "fast_path = false", "2.24.1")
    assert off.describe() == "fast path off because fast_path = false, asyncssh 2.24.1 as shipped"
    assert transport.TransportStatus(True, "", "2.24.1").describe() == "fast path on, asyncssh 2.24.1"


@pytest.mark.parametrize("status, level, fix", [
    (transport.TransportStatus(True, "", "2.24.1"), OK, ""),
    (transport.TransportStatus(False, "fast_path = false", "2.24.1"), NOTE, "fast_path = true"),
    (transport.TransportStatus(False, "asyncssh differs from the version it was written for in 3 functions "
                                      "(a b c)", "2.25.0"), NOTE, "requirements.lock"),
])
def test_doctor_finding(status, level, fix):
    finding = transport_finding(status.fast_path, status.describe(), status.reason)
    assert (finding.check, finding.level) == ("transport", level)
    assert finding.message == status.describe()
    assert fix in finding.fix
    assert summary([finding]) == "all checks passed"  # a note fails nothing, and counts as nothing to fix
