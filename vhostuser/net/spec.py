"""virtio-net wire constants and config space (virtio 1.4, 5.1).

tests/unit/test_protocol.py checks them against linux/virtio_net.h.
"""
from __future__ import annotations

import enum
import struct


class NetFeature(enum.IntEnum):
    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    GUEST_ANNOUNCE = 21
    MQ = 22


HDR = struct.Struct("<BBHHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
HDR_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_ECN = 0, 1, 3, 4, 0x80
STATUS_LINK_UP = 1
STATUS_ANNOUNCE = 2

# struct virtio_net_config up to mtu: mac[6], status, max_virtqueue_pairs, mtu
CONFIG = struct.Struct("<6sHHH")


def pack_config(mac: bytes, status: int, max_pairs: int, mtu: int) -> bytes:
    return CONFIG.pack(mac, status, max_pairs, mtu)


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {text!r}") from None
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)
