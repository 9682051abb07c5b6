"""The bench's TCP congestion control (bench/bed.py): its namespaces get the algorithm asked for, and the
host's allowed list, widened for that when it must be, is put back as it was."""

from pathlib import Path

import pytest

from bed import ALLOWED_CC, set_congestion_control
from testbed import Testbed, TestbedError

AVAILABLE = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")

pytestmark = pytest.mark.netns


def test_namespaces_get_an_algorithm_the_host_does_not_allow_and_the_allowed_list_is_put_back(tmp_path):
    original = ALLOWED_CC.read_text().strip()
    candidates = [name for name in AVAILABLE.read_text().split() if name != "reno"]
    if not candidates:
        pytest.skip("this kernel offers no congestion control but reno")
    name = "cubic" if "cubic" in candidates else candidates[0]
    narrowed = " ".join(n for n in original.split() if n != name) or "reno"
    bed = Testbed(tmp_path).create()
    try:
        ALLOWED_CC.write_text(narrowed)  # the host does not allow it, as a host defaulting to bbr does not
        before = set_congestion_control(bed, name)
        for ns in (bed.gw, bed.lan):
            used = bed.run(ns, ["sysctl", "-n", "net.ipv4.tcp_congestion_control"], check=True).stdout
            assert used.decode().strip() == name
        assert before == narrowed
        ALLOWED_CC.write_text(before)  # what Bench.close does
        assert ALLOWED_CC.read_text().split() == narrowed.split()
        # already allowed: nothing to put back
        ALLOWED_CC.write_text(f"{narrowed} {name}")
        assert set_congestion_control(bed, name) is None
    finally:
        ALLOWED_CC.write_text(original)
        bed.close()


def test_an_algorithm_the_kernel_lacks_is_refused(tmp_path):
    bed = Testbed(tmp_path).create()
    try:
        with pytest.raises(TestbedError, match="not available here"):
            set_congestion_control(bed, "no-such-algorithm")
    finally:
        bed.close()
