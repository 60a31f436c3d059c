"""One command line (issue 16): one name per idea across vhostuser-blk,
vhostuser-net, vhostuser-ctl add-blk/add-net, vhostuser-fuzz and the
daemon's spec keys, QEMU's back-end program conventions kept
(--socket-path, --fd, --print-capabilities, --blk-file, --read-only), and
the old spellings accepted but hidden from --help."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys

import pytest

from vhostuser.cli import blk, ctl, daemon, fuzz, net
from vhostuser.manage import specs

# -- the commands, each with what it needs besides the option under test --------

COMMANDS = {
    "vhostuser-blk": (lambda argv: blk.parser().parse_args(argv), ["--ramdisk", "1M"]),
    "vhostuser-net": (net.parse_args, ["--sink"]),
    "vhostuser-ctl add-blk": (lambda argv: ctl.parser().parse_args(["add-blk", "d0", *argv]),
                              ["--ramdisk", "1M"]),
    "vhostuser-ctl add-net": (lambda argv: ctl.parser().parse_args(["add-net", "n0", *argv]),
                              ["--tap", "t0"]),
    "vhostuser-fuzz": (lambda argv: fuzz.parser().parse_args(argv), []),
}
BACK_ENDS = ("vhostuser-blk", "vhostuser-net")
EXPORTS = ("vhostuser-ctl add-blk", "vhostuser-ctl add-net")
DISKS = ("vhostuser-blk", "vhostuser-ctl add-blk")
NICS = ("vhostuser-net", "vhostuser-ctl add-net")

#: idea -> (option, value, the parsed attribute and value, the commands with it)
SHARED = {
    "socket": ("--socket-path", "/run/x.sock", "socket_path", "/run/x.sock",
               BACK_ENDS + EXPORTS),
    "socket group": ("--socket-group", "kvm", "socket_group", "kvm", BACK_ENDS + EXPORTS),
    "socket mode": ("--socket-mode", "0660", "socket_mode", "0660", BACK_ENDS + EXPORTS),
    "image": ("--blk-file", "/img", "blk_file", "/img", DISKS),
    "queues (blk)": ("--queues", "4", "queues", 4, DISKS),
    "queues (net)": ("--queues", "4", "queues", 4, NICS),
    "polling": ("--poll-us", "50", "poll_us", 50, BACK_ENDS + EXPORTS),
    "adaptive polling": ("--adaptive-poll-us", "8", "adaptive_poll_us", 8,
                         BACK_ENDS + EXPORTS),
    "workers": ("--queues-per-thread", "2", "queues_per_thread", 2, BACK_ENDS + EXPORTS),
    "iops": ("--iops", "100", "iops", 100, DISKS),
    "bps": ("--bps", "1048576", "bps", 1 << 20, DISKS),
    "iops burst": ("--iops-burst", "10", "iops_burst", 10, DISKS),
    "bps burst": ("--bps-burst", "4096", "bps_burst", 4096, DISKS),
    "read-only": ("--read-only", None, "read_only", True, DISKS),
    "serial": ("--serial", "s1", "serial", "s1", DISKS),
    "aio": ("--aio", "sync", "aio", "sync", DISKS),
    "direct": ("--direct", None, "direct", True, DISKS),
    "nbd": ("--nbd", "nbd://h/e", "nbd", "nbd://h/e", DISKS),
    "nbd connections": ("--nbd-connections", "2", "nbd_connections", 2, DISKS),
    "rbd": ("--rbd", "p/i", "rbd", "p/i", DISKS),
    "rbd conf": ("--rbd-conf", "/etc/ceph/c.conf", "rbd_conf", "/etc/ceph/c.conf", DISKS),
    "rbd id": ("--rbd-id", "u", "rbd_id", "u", DISKS),
    "remote timeout": ("--remote-timeout", "5", "remote_timeout", 5.0, DISKS),
    "python back-end": ("--backend", "m:C", "backend", "m:C", DISKS + NICS),
    "back-end options": ("--backend-opt", "k=v", "backend_opt", ["k=v"], DISKS + NICS),
    "tap": ("--tap", "t1", "tap", "t1", NICS),
    "mac": ("--mac", "52:54:00:00:00:01", "mac", "52:54:00:00:00:01", NICS),
    "mtu": ("--mtu", "9000", "mtu", 9000, NICS),
    "in-order": ("--no-in-order", None, "in_order", False, NICS),
    "fuzz socket": ("--socket-path", "/run/x.sock", "socket", "/run/x.sock",
                    ("vhostuser-fuzz",)),
}

#: old spelling -> (the name it stands for, a value, the commands that had it)
ALIASES = {
    "--socket": ("--socket-path", "/run/x.sock", EXPORTS + ("vhostuser-fuzz",)),
    "--file": ("--blk-file", "/img", ("vhostuser-ctl add-blk",)),
    "--num-queues": ("--queues", "4", DISKS),
    "--queue-pairs": ("--queues", "4", ("vhostuser-ctl add-net",)),
    "--poll": ("--poll-us", "50", BACK_ENDS + EXPORTS),
    "--adaptive-poll": ("--adaptive-poll-us", "8", BACK_ENDS + EXPORTS),
    "--iops-limit": ("--iops", "100", DISKS),
    "--bps-limit": ("--bps", "1048576", DISKS),
}


SOURCES = {"--blk-file", "--file", "--nbd", "--rbd", "--backend", "--tap"}


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    fn, base = COMMANDS[command]
    if SOURCES & set(argv):         # the option under test is the source
        base = []
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return fn([*base, *argv])
        except SystemExit as exc:
            raise AssertionError(f"{command} {' '.join(argv)}: {err.getvalue()}") from exc


def shared_cases():
    return [(idea, command) for idea, (*_, commands) in SHARED.items() for command in commands]


@pytest.mark.parametrize("idea, command", shared_cases(),
                         ids=[f"{c}:{i}" for i, c in shared_cases()])
def test_every_command_accepts_the_shared_name(idea, command):
    option, value, attr, expected, _ = SHARED[idea]
    args = parse(command, [option] + ([value] if value is not None else []))
    got = getattr(args, attr)
    assert got == expected, (command, option, got)


def alias_cases():
    return [(old, command) for old, (*_, commands) in ALIASES.items() for command in commands]


@pytest.mark.parametrize("old, command", alias_cases(), ids=[f"{c}:{o}" for o, c in alias_cases()])
def test_old_spellings_mean_the_same(old, command):
    new, value, _ = ALIASES[old]
    assert vars(parse(command, [old, value])) == vars(parse(command, [new, value]))


def test_old_poll_without_a_value_still_means_1000_us():
    assert blk.parser().parse_args(["--ramdisk", "1M", "--poll"]).poll_us == 1000
    assert blk.parser().parse_args(["--ramdisk", "1M"]).poll_us == 0


def help_text(command: str) -> str:
    parser = {"vhostuser-blk": blk.parser, "vhostuser-net": net.parser,
              "vhostuser-fuzz": fuzz.parser, "vhostuser-daemon": daemon.parser}.get(command)
    if parser is None:
        sub = command.split()[1]
        top = ctl.parser()
        action = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices[sub].format_help()
    return parser().format_help()


@pytest.mark.parametrize("command", COMMANDS)
def test_old_spellings_are_hidden_and_the_names_shown(command):
    text = help_text(command)
    for old, (new, _, commands) in ALIASES.items():
        if command in commands:
            assert f"{old} " not in text and f"{old}," not in text and f"{old}\n" not in text, \
                (command, old)
            assert new in text, (command, new)


def test_qemu_backend_conventions_are_kept():
    """vhost-user.rst's back-end program interface, on both back-ends."""
    for command in BACK_ENDS:
        text = help_text(command)
        for option in ("--socket-path", "--fd", "--print-capabilities"):
            assert option in text, (command, option)
    text = help_text("vhostuser-blk")
    assert "--blk-file" in text and "--read-only" in text


# -- vhostuser-ctl's options are the daemon's spec keys -----------------------------

def spec_of(argv: list[str]) -> dict:
    return ctl.request_of(ctl.parser().parse_args(argv))[1]


def test_ctl_options_become_spec_keys_of_the_same_name(tmp_path):
    disk = spec_of(["add-blk", "d0", "--socket-path", "/run/d0.sock", "--blk-file", "/img",
                    "--queues", "2", "--poll-us", "5", "--adaptive-poll-us", "7",
                    "--queues-per-thread", "2", "--socket-group", "kvm", "--socket-mode", "0640",
                    "--read-only", "--serial", "s", "--aio", "sync", "--direct", "--iops", "9"])
    assert disk == {"type": "blk", "name": "d0", "socket_path": "/run/d0.sock",
                    "blk_file": "/img", "queues": 2, "poll_us": 5, "adaptive_poll_us": 7,
                    "queues_per_thread": 2, "socket_group": "kvm", "socket_mode": "0640",
                    "read_only": True, "serial": "s", "aio": "sync", "direct": True,
                    "qos": {"iops": 9}}
    nic = spec_of(["add-net", "n0", "--socket-path", "/run/n0.sock", "--backend", "m:C",
                   "--backend-opt", "a=1", "--backend-opt", "b-c=2", "--queues", "2",
                   "--mtu", "9000", "--no-in-order"])
    assert nic == {"type": "net", "name": "n0", "socket_path": "/run/n0.sock",
                   "backend": "m:C", "backend_opt": {"a": "1", "b-c": "2"}, "queues": 2,
                   "mtu": 9000, "in_order": False}
    remote = spec_of(["add-blk", "r0", "--socket", "r.sock", "--rbd", "pool/img",
                      "--rbd-conf", "ceph.conf", "--rbd-id", "u", "--remote-timeout", "3"])
    assert remote["rbd_conf"] == os.path.abspath("ceph.conf")
    assert remote["socket_path"] == os.path.abspath("r.sock")
    assert (remote["rbd"], remote["rbd_id"], remote["remote_timeout"]) == ("pool/img", "u", 3.0)


def every_option(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS
            and a.dest != "help"]


@pytest.mark.parametrize("kind", ["blk", "net"])
def test_no_ctl_add_option_is_unknown_to_the_daemon(kind):
    """Each add-blk/add-net option is a spec key (or the qos object's)."""
    top = ctl.parser()
    action = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    sub = action.choices[f"add-{kind}"]
    sources = specs.BLK_SOURCES if kind == "blk" else specs.NET_SOURCES
    options = specs.BLK_OPTIONS if kind == "blk" else specs.NET_OPTIONS
    known = set(specs.BASE_KEYS) | set(options) | set(sources)
    for source in sources.values():
        known |= set(source.options)
    known |= {"iops", "bps", "iops_burst", "bps_burst"}      # the qos object's keys
    for a in every_option(sub):
        assert a.dest in known, f"add-{kind} {a.option_strings[0]} is no spec key"


def test_old_spec_keys_still_work_and_both_at_once_is_refused(tmp_path):
    image = tmp_path / "i.img"
    image.write_bytes(bytes(4096))
    old = specs.parse_spec({"type": "blk", "name": "a", "socket": f"{tmp_path}/a.sock",
                            "file": str(image), "num_queues": 2})
    new = specs.parse_spec({"type": "blk", "name": "a", "socket_path": f"{tmp_path}/a.sock",
                            "blk_file": str(image), "queues": 2})
    assert old == new
    net_old = specs.parse_spec({"type": "net", "name": "n", "socket": f"{tmp_path}/n.sock",
                                "backend": "null", "queue_pairs": 3})
    assert net_old.settings["queues"] == 3
    with pytest.raises(specs.BadArgument, match="'file' is the old name of 'blk_file'"):
        specs.parse_spec({"type": "blk", "name": "a", "socket_path": f"{tmp_path}/a.sock",
                          "blk_file": str(image), "file": str(image)})


# -- the checks that need every option --------------------------------------------

def run(module: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("argv, message", [
    (["--socket-path", "/tmp/vhu-a.sock", "--socket-path", "/tmp/vhu-b.sock", "--sink"],
     "vhostuser-net: 2 --socket-path options without --switch: one socket serves one guest "
     "(--switch connects several)"),
    (["--switch", "--socket-path", "/tmp/vhu-a.sock", "--sink"],
     "vhostuser-net: --switch forwards between its ports (and --tap or --vxlan); --sink serves "
     "one guest alone: give one or the other"),
    (["--switch", "--socket-path", "/tmp/vhu-a.sock", "--loopback"],
     "vhostuser-net: --switch forwards between its ports (and --tap or --vxlan); --loopback "
     "serves one guest alone: give one or the other"),
])
def test_vhostuser_net_refuses_what_it_would_get_wrong(argv, message):
    r = run("vhostuser.cli.net", *argv)
    assert (r.returncode, r.stderr) == (1, message + "\n")
    assert not os.path.exists("/tmp/vhu-a.sock") and not os.path.exists("/tmp/vhu-b.sock")


def test_aio_is_for_a_file_only():
    r = run("vhostuser.cli.blk", "--socket-path", "/tmp/vhu-a.sock", "--ramdisk", "1M",
            "--aio", "io_uring")
    assert (r.returncode, r.stderr) == (1, "vhostuser-blk: --aio is for --blk-file only (the "
                                           "other sources have their own I/O)\n")


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm")
def test_io_uring_not_used_is_said_at_the_default_log_level(tmp_path):
    """An image on tmpfs is served with synchronous I/O, though io_uring
    was asked for: the program says so without -v."""
    from vhostuser_devkit.program import BackendProgram
    image = f"/dev/shm/vhu-aio-{os.getpid()}.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    try:
        with BackendProgram("vhostuser.cli.blk", "--blk-file", image, "--aio", "io_uring",
                            socket=tmp_path / "a.sock", log=tmp_path / "a.log") as prog:
            assert prog.terminate() == 0
        assert (f"WARNING: {image}: aio io_uring asked for, synchronous I/O used: the image is "
                "in memory (tmpfs)") in prog.output(), prog.output()
    finally:
        os.unlink(image)
