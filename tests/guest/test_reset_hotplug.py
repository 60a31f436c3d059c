"""Device reset and memory hotplug with vhostuser-blk under a real guest
(TCG), on QEMU 7.2 and on QEMU 10: the protocol paths (device reset,
memory slots) where QEMU versions differ most.

* Driver reload: the guest unbinds its disk from virtio_blk and binds it
  again (the driver resets the device: status 0, QEMU stops the vhost rings
  with GET_VRING_BASE, then starts them afresh); the disk works again and
  keeps its data.
* Memory hotplug: a DIMM backed by a shared memfd is plugged over QMP while
  the guest does I/O; QEMU tells the back-end with ADD_MEM_REG; the guest
  onlines the new memory, fills the old one, and then does page-cache I/O
  whose pages live in the new memory.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

from vhostuser_devkit import guest
from vhostuser_devkit.guest import MIB
from vhostuser_devkit.qmp import QMP

from test_reconnect import Backend   # noqa: E402  (same directory, on sys.path under pytest)

_PRELUDE = r"""
fail() { echo "RESULT-FAIL $*"; exit 1; }
sha() { sha256sum | cut -d' ' -f1; }
"""


def fresh_image(tmp_path: Path, mb: int = 64) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(mb * MIB)
    return path


# --------------------------------------------------------------------------
# Driver reload
# --------------------------------------------------------------------------

RELOADS = 3

RELOAD_WORKLOAD = _PRELUDE + f"""
DEV=/dev/vda
name=$(basename "$(readlink /sys/block/vda/device)")
echo "RESULT vdev=$name"
DRV=/sys/bus/virtio/drivers/virtio_blk
r=1
while [ $r -le {RELOADS} ]; do
    dd if=/dev/urandom of=/tmp/data.$r bs=64k count=16 2>/dev/null
    dd if=/tmp/data.$r of=$DEV bs=64k seek=$((r * 16)) oflag=direct conv=notrunc 2>/dev/null \\
        || fail "write before reload $r"
    echo "$name" > $DRV/unbind || fail "unbind $r"
    [ -e /sys/block/vda ] && fail "vda still there after unbind"
    echo "$name" > $DRV/bind || fail "bind $r"
    i=0; while [ ! -b $DEV ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b $DEV ] || fail "no $DEV after bind $r"
    # everything written before every reload so far reads back
    k=1
    while [ $k -le $r ]; do
        [ "$(dd if=$DEV bs=64k skip=$((k * 16)) count=16 iflag=direct 2>/dev/null | sha)" = \\
          "$(sha < /tmp/data.$k)" ] || fail "data of round $k after reload $r"
        k=$((k + 1))
    done
    # and the disk takes writes again
    dd if=/tmp/data.$r of=$DEV bs=64k seek=$((r * 16 + 256)) oflag=direct conv=notrunc \\
        2>/dev/null || fail "write after reload $r"
    sha < /tmp/data.$r > /tmp/sha.$r
    echo "RELOADED $r $(cat /tmp/sha.$r)"
    r=$((r + 1))
done
dmesg > /tmp/dmesg
echo "RESULT io_errors=$(grep -c -e 'I/O error' -e 'blk_update_request' /tmp/dmesg)"
echo "RESULT reloads=$((r - 1))"
"""


def test_driver_reload_resets_the_device_and_the_disk_works_again(guest_kit, sock_dir, tmp_path,
                                                                   capsys, qemu):
    image = fresh_image(tmp_path)
    backend = Backend(sock_dir / "blk.sock", ["-v", "--blk-file", str(image)])   # -vv
    backend.start()
    try:
        result = guest.run_guest(guest_kit, RELOAD_WORKLOAD, blk_sockets=[str(backend.sock)],
                                 timeout=120, pvh=True, qemu=qemu)
    finally:
        rc = backend.terminate()
        backend.keep_log("reload")
    log = backend.log_text()
    got = result.results()
    reloaded = re.findall(r"^RELOADED (\d+) ([0-9a-f]{64})$", result.serial, re.M)
    messages = re.findall(r"vhostuser\.handler DEBUG: \S+: ([A-Z_]+) \(", log)
    stops = messages.count("GET_VRING_BASE")
    with capsys.disabled():
        print(f"\n[reload {qemu.label}] driver reloads: {got.get('reloads')}; device {got.get('vdev')}; "
              f"rings stopped (GET_VRING_BASE): {stops}; SET_STATUS: {messages.count('SET_STATUS')}"
              f"; RESET_DEVICE: {messages.count('RESET_DEVICE')}; SET_INFLIGHT_FD: "
              f"{messages.count('SET_INFLIGHT_FD')}; SET_MEM_TABLE: "
              f"{messages.count('SET_MEM_TABLE')}")
    result.check()
    assert rc == 0
    assert got["reloads"] == str(RELOADS) and len(reloaded) == RELOADS
    assert got["io_errors"] == "0", result.tail()
    # every reload went through the back-end: the ring stopped and restarted
    assert stops >= RELOADS, messages
    assert "Traceback" not in log and " ERROR" not in log, log[-3000:]
    # what the guest wrote after each reload is in the image
    data = image.read_bytes()
    for r, digest in reloaded:
        off = (int(r) * 16 + 256) * 65536
        assert hashlib.sha256(data[off:off + MIB]).hexdigest() == digest


# --------------------------------------------------------------------------
# Memory hotplug
# --------------------------------------------------------------------------

BOOT_MB = 256
DIMM_MB = 256

HOTPLUG_WORKLOAD = _PRELUDE + r"""
DEV=/dev/vda
echo "RESULT mem_before=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
# background I/O while the DIMM is plugged
( i=0; while [ ! -e /tmp/stop ]; do
      dd if=/dev/urandom of=/tmp/bg bs=64k count=4 2>/dev/null
      dd if=/tmp/bg of=$DEV bs=64k seek=$((i % 64 * 4)) oflag=direct conv=notrunc 2>/dev/null \
          || echo "BGFAIL $i"
      [ "$(dd if=$DEV bs=64k skip=$((i % 64 * 4)) count=4 iflag=direct 2>/dev/null | sha)" = \
        "$(sha < /tmp/bg)" ] || echo "BGBAD $i"
      i=$((i + 1))
  done; echo "BGDONE $i" ) &
echo "READY-FOR-DIMM"
# wait for the new memory blocks, then online them (movable: page cache may use them)
i=0; n=0
while [ $i -lt 300 ]; do
    n=0
    for b in /sys/devices/system/memory/memory*; do
        [ "$(cat $b/state)" = offline ] && n=$((n + 1))
    done
    [ $n -gt 0 ] && break
    sleep 0.1; i=$((i + 1))
done
echo "RESULT offline_blocks=$n"
for b in /sys/devices/system/memory/memory*; do
    [ "$(cat $b/state)" = offline ] && { echo online_movable > $b/state || echo online > $b/state; }
done
echo "RESULT mem_after=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
touch /tmp/stop; wait
movable_file() {
    awk '/^Node .* zone +Movable/ {m=1; next} /^Node/ {m=0} m && /nr_zone_(in)?active_file/ {s+=$2} END {print s+0}' /proc/zoneinfo
}
# ext4's page cache is movable memory, which the new (movable) zone serves first:
# the virtio-blk requests for these pages point into the DIMM.
mkfs.ext4 -F -q $DEV || fail mkfs
mount -t ext4 $DEV /mnt || fail mount
dd if=/dev/urandom of=/tmp/big bs=1M count=24 2>/dev/null
want=$(sha < /tmp/big)
cp /tmp/big /mnt/big || fail "write big"
sync
echo "RESULT movable_file_pages_written=$(movable_file)"
umount /mnt; echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro $DEV /mnt || fail remount
got=$(sha < /mnt/big)
echo "RESULT movable_file_pages_read=$(movable_file)"
echo "RESULT big_ok=$([ "$got" = "$want" ] && echo 1 || echo 0) big_sha=$want"
umount /mnt; echo 3 > /proc/sys/vm/drop_caches
# hot-unplug: the kernel offlines the blocks (moving their pages) on QEMU's eject request
echo "READY-FOR-UNPLUG"
i=0; while [ -e /sys/devices/system/memory/memory32 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
echo "RESULT unplugged=$([ -e /sys/devices/system/memory/memory32 ] && echo 0 || echo 1)"
echo "RESULT mem_unplugged=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
mount -t ext4 -o ro $DEV /mnt || fail "mount after unplug"
echo "RESULT big_after_unplug=$([ "$(sha < /mnt/big)" = "$want" ] && echo 1 || echo 0)"
umount /mnt
dmesg > /tmp/dmesg
echo "RESULT io_errors=$(grep -c -e 'I/O error' -e 'blk_update_request' /tmp/dmesg)"
grep -i -e memory -e acpi /tmp/dmesg | tail -5 | sed 's/^/DMESG /'
grep -e '^Node' -e 'nr_zone_.*file' -e ' managed' -e 'nr_free_pages' /proc/zoneinfo | sed 's/^/ZONE /'
for b in /sys/devices/system/memory/memory*; do echo "BLOCK $b $(cat $b/state) $(cat $b/valid_zones 2>/dev/null)"; done | grep -v 'online Normal$' | head
"""


def test_memory_hotplug_reaches_the_backend_and_io_uses_the_new_memory(guest_kit, sock_dir,
                                                                        tmp_path, capsys, qemu):
    image = fresh_image(tmp_path)
    backend = Backend(sock_dir / "blk.sock", ["-v", "--blk-file", str(image)])   # -vv
    backend.start()
    try:
        with guest.GuestProcess(
                guest_kit, HOTPLUG_WORKLOAD, blk=[guest.QemuBlk(str(backend.sock))],
                memory_mb=BOOT_MB, pvh=True, qemu=qemu,
                extra_args=["-m", f"{BOOT_MB}M,slots=4,maxmem=2G"]) as vm:
            vm.wait_for(r"^READY-FOR-DIMM", timeout=60)
            before = backend.log_text().count(": ADD_MEM_REG (")
            with QMP.connect(vm.qmp_path) as qmp:
                qmp.command("object-add", **{"qom-type": "memory-backend-memfd", "id": "hp0",
                                             "size": DIMM_MB * MIB, "share": True})
                qmp.command("device_add", driver="pc-dimm", id="dimm0", memdev="hp0")
                dimms = qmp.command("query-memory-devices")
                vm.wait_for(r"^READY-FOR-UNPLUG", timeout=90)
                before_rem = backend.log_text().count(": REM_MEM_REG (")
                qmp.command("device_del", id="dimm0")
                try:
                    qmp.wait_event("DEVICE_DELETED", timeout=40)
                    qmp.command("object-del", id="hp0")
                    unplugged = True
                except TimeoutError:
                    unplugged = False
            result = vm.wait(timeout=150)
    finally:
        rc = backend.terminate()
        backend.keep_log("hotplug")
    log = backend.log_text()
    got = result.results()
    messages = re.findall(r"vhostuser\.handler DEBUG: \S+: ([A-Z_]+) \(", log)
    added = messages.count("ADD_MEM_REG") - before
    rounds = re.findall(r"BGDONE (\d+)", result.serial)
    removed = backend.log_text().count(": REM_MEM_REG (") - before_rem
    with capsys.disabled():
        print(f"\n[unplug {qemu.label}] DEVICE_DELETED: {unplugged}; REM_MEM_REG after device_del: {removed}; "
              f"guest MemTotal after: {got.get('mem_unplugged')} kB; data read back after: "
              f"{got.get('big_after_unplug')}")
        print(f"[hotplug] DIMMs: {[d['data']['size'] // MIB for d in dimms]} MiB; "
              f"ADD_MEM_REG at boot {before}, after device_add {added}; SET_MEM_TABLE: {messages.count('SET_MEM_TABLE')}; "
              f"guest MemTotal {got.get('mem_before')} -> {got.get('mem_after')} kB, "
              f"blocks onlined {got.get('offline_blocks')}, page-cache pages in the new "
              f"memory after writing/reading: {got.get('movable_file_pages_written')}/"
              f"{got.get('movable_file_pages_read')}, background rounds: "
              f"{rounds}")
    result.check()
    assert rc == 0
    assert added >= 1, messages
    assert int(got["offline_blocks"]) > 0, result.tail()
    assert int(got["mem_after"]) > int(got["mem_before"])
    assert not re.search(r"^BG(FAIL|BAD)", result.serial, re.M), result.tail()
    assert got["big_ok"] == "1" and got["io_errors"] == "0", result.tail()
    assert int(got["movable_file_pages_written"]) > 0 and int(got["movable_file_pages_read"]) > 0, "no I/O landed in the hotplugged memory\n" + result.tail(60)
    big = subprocess.run(["debugfs", "-R", "cat /big", str(image)], capture_output=True,
                         check=True).stdout
    assert hashlib.sha256(big).hexdigest() == got["big_sha"]
    assert "Traceback" not in log and " ERROR" not in log, log[-3000:]
    # hot-unplug: REM_MEM_REG, and the disk still works from the old memory
    assert unplugged and got["unplugged"] == "1", result.tail()
    assert removed >= 1
    assert got["big_after_unplug"] == "1"
