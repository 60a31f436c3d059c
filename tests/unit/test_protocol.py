"""Protocol constants are checked against the kernel's headers, so they are
never retyped wrongly (and never in two places)."""
import pathlib
import re

import pytest

from vhostuser import protocol
from vhostuser.blk.spec import CONFIG, BlkFeature, BlkStatus, BlkType

INCLUDE = pathlib.Path("/usr/include/linux")


def header_defines(name: str) -> dict[str, int]:
    path = INCLUDE / name
    if not path.exists():
        pytest.skip(f"{path} not installed (linux-libc-dev)")
    defines = {}
    for m in re.finditer(r"#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", path.read_text()):
        defines[m.group(1)] = int(m.group(2), 0)
    return defines


def test_virtio_feature_bits_match_kernel():
    d = header_defines("virtio_config.h") | header_defines("virtio_ring.h")
    assert protocol.Feature.VERSION_1 == d["VIRTIO_F_VERSION_1"]
    assert protocol.Feature.RING_PACKED == d["VIRTIO_F_RING_PACKED"]
    assert protocol.Feature.ACCESS_PLATFORM == d["VIRTIO_F_ACCESS_PLATFORM"]
    assert protocol.Feature.IN_ORDER == d["VIRTIO_F_IN_ORDER"]
    assert protocol.Feature.RING_INDIRECT_DESC == d["VIRTIO_RING_F_INDIRECT_DESC"]
    assert protocol.Feature.RING_EVENT_IDX == d["VIRTIO_RING_F_EVENT_IDX"]
    assert protocol.Feature.NOTIFY_ON_EMPTY == d["VIRTIO_F_NOTIFY_ON_EMPTY"]


def test_vhost_log_constants_match_kernel():
    d = header_defines("vhost_types.h")
    assert protocol.Feature.LOG_ALL == d["VHOST_F_LOG_ALL"]
    assert protocol.VHOST_VRING_F_LOG == d["VHOST_VRING_F_LOG"]


def test_blk_constants_match_kernel():
    d = header_defines("virtio_blk.h")
    for f in BlkFeature:
        key = f"VIRTIO_BLK_F_{f.name}"
        if key in d:
            assert f == d[key], key
    for t in BlkType:
        key = f"VIRTIO_BLK_T_{t.name}"
        if key in d:
            assert t == d[key], key
    for s in BlkStatus:
        assert s == d[f"VIRTIO_BLK_S_{s.name}"]


def test_blk_config_layout_matches_spec_offsets():
    # virtio 1.4 5.2.4: writeback at 32, num_queues at 34, discard fields from 36.
    packed = CONFIG.pack(*range(1, 24))
    assert int.from_bytes(packed[32:33], "little") == 12   # writeback
    assert int.from_bytes(packed[34:36], "little") == 14   # num_queues
    assert int.from_bytes(packed[36:40], "little") == 15   # max_discard_sectors
    assert int.from_bytes(packed[68:72], "little") == 23   # secure_erase_sector_alignment


def test_every_request_in_the_spec_has_a_table_entry():
    # The list of requests a back-end must parse and answer.
    required = """GET_FEATURES SET_FEATURES GET_PROTOCOL_FEATURES SET_PROTOCOL_FEATURES SET_OWNER
    RESET_OWNER SET_MEM_TABLE SET_LOG_BASE SET_LOG_FD SET_VRING_NUM SET_VRING_ADDR
    SET_VRING_BASE GET_VRING_BASE SET_VRING_KICK SET_VRING_CALL SET_VRING_ERR GET_QUEUE_NUM
    SET_VRING_ENABLE SET_SLAVE_REQ_FD GET_CONFIG SET_CONFIG GET_INFLIGHT_FD SET_INFLIGHT_FD
    RESET_DEVICE VRING_KICK GET_MAX_MEM_SLOTS ADD_MEM_REG REM_MEM_REG SET_STATUS
    GET_STATUS""".split()
    for name in required:
        assert protocol.Request[name] in protocol.REQUEST_SPECS, name


def test_request_ids_match_spec_text():
    # vhost-user.rst lists each request with ":id: N"; parse the shipped copy.
    rst = pathlib.Path(__file__).resolve().parents[3] / "shared/reference/vhost-user.rst"
    if not rst.exists():
        pytest.skip("reference spec not beside the checkout")
    text = rst.read_text()
    front, back = text.split("Back-end message types")
    fronts = re.findall(r"``VHOST_USER_(\w+)``\n\s+:id: (\d+)", front)
    backs = re.findall(r"``VHOST_USER_SLAVE_(\w+)``\n\s+:id: (\d+)", back)
    assert len(fronts) == 40 and len(backs) == 5
    for name, ident in fronts:
        assert protocol.Request[name] == int(ident), name
    for name, ident in backs:
        assert protocol.BackendRequest[name] == int(ident), name


def test_net_constants_match_kernel():
    from vhostuser.net.spec import GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP, HDR, NetFeature
    d = header_defines("virtio_net.h")
    for f in NetFeature:
        assert f == d[f"VIRTIO_NET_F_{f.name}"], f.name
    assert (GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_ECN) == (
        d["VIRTIO_NET_HDR_GSO_NONE"], d["VIRTIO_NET_HDR_GSO_TCPV4"], d["VIRTIO_NET_HDR_GSO_UDP"],
        d["VIRTIO_NET_HDR_GSO_TCPV6"], d["VIRTIO_NET_HDR_GSO_ECN"])
    assert HDR.size == 12   # struct virtio_net_hdr_v1
