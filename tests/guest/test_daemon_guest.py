"""vhostuser-daemon serving two disks to one real guest, changed while the
guest runs: one disk grows (the guest sees the new size), the other turns
read-only (the guest's writes fail, its reads don't), and the first gets a
QoS limit that holds it while its neighbour in the same process runs free."""
from __future__ import annotations

import re

from vhostuser_devkit import guest
from vhostuser_devkit.daemon import DaemonProcess
from vhostuser_devkit.guest import MIB

QOS_IOPS = 40
READS = 120
GO_SECTORS = 128 * MIB // 512

WORKLOAD = f"""
old=$(cat /sys/block/vda/size)
echo "READY size=$old"
i=0
while [ "$(cat /sys/block/vda/size)" = "$old" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "RESULT size_after=$(cat /sys/block/vda/size)"
# The host changes the rest, then grows vda once more to say "go on".
i=0
while [ "$(cat /sys/block/vda/size)" != {GO_SECTORS} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null
echo "RESULT ro_write=$?"
dd if=/dev/vdb of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null
echo "RESULT ro_read=$?"
elapsed() {{ t0=$(cut -d' ' -f1 /proc/uptime); "$@"; t1=$(cut -d' ' -f1 /proc/uptime);
            echo "$t0 $t1" | awk '{{printf "%d", ($2-$1)*1000}}'; }}
ms=$(elapsed dd if=/dev/vda of=/dev/null bs=4096 count={READS} iflag=direct 2>/dev/null)
echo "RESULT limited_ms=$ms"
ms=$(elapsed dd if=/dev/vdb of=/dev/null bs=4096 count={READS} iflag=direct 2>/dev/null)
echo "RESULT neighbour_ms=$ms"
"""


def test_daemon_changes_reach_a_running_guest(guest_kit, tmp_path):
    d = DaemonProcess(str(tmp_path))
    try:
        images = {}
        for name in ("a", "b"):
            images[name] = tmp_path / f"{name}.img"
            images[name].write_bytes(b"")
            with open(images[name], "r+b") as f:
                f.truncate(64 * MIB)
            d.ctl("add-blk", name, "--socket-path", d.path(f"{name}.sock"),
                  "--blk-file", str(images[name]))
        with guest.GuestProcess(guest_kit, WORKLOAD, pvh=True,
                                blk=[guest.QemuBlk(d.path("a.sock")),
                                     guest.QemuBlk(d.path("b.sock"))]) as vm:
            vm.wait_for(r"^READY size=", timeout=90)
            d.ctl("resize", "a", str(96 * MIB))
            vm.wait_for(r"^RESULT size_after=", timeout=60)
            d.ctl("set-read-only", "b", "on")
            d.ctl("set-qos", "a", "--iops", str(QOS_IOPS), "--iops-burst", "1")
            d.ctl("resize", "a", str(128 * MIB))
            result = vm.wait(timeout=180)
        got = result.results()
        stats = d.call("stats", name="a")
    finally:
        assert d.terminate() == 0, d.output()
    print(got)
    assert got["size_after"] == str(96 * MIB // 512)
    assert got["ro_write"] != "0"        # refused: IOERR reaches the guest
    assert got["ro_read"] == "0"
    limited_s = int(got["limited_ms"]) / 1000
    neighbour_s = int(got["neighbour_ms"]) / 1000
    # READS requests at QOS_IOPS per second can't finish sooner than this
    # (one token of burst), however fast the guest is.
    assert limited_s >= (READS - 1) / QOS_IOPS * 0.9, got
    assert neighbour_s < limited_s / 2, got
    assert any(q["throttled"] > 0 for q in stats["queues"]), stats
    assert re.search(r"Traceback", d.output()) is None, d.output()
