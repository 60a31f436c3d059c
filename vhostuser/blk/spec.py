"""virtio-blk wire constants and the config space layout (virtio 1.4, 5.2).

tests/unit/test_protocol.py checks these against linux/virtio_blk.h.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass


class BlkFeature(enum.IntEnum):
    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16


class BlkType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


SECTOR = 512
ID_BYTES = 20
WRITE_ZEROES_FLAG_UNMAP = 1
OUTHDR = struct.Struct("<IIQ")          # type, ioprio (reserved), sector
DISCARD_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
LIFETIME = struct.Struct("<HHH")

# struct virtio_blk_config, up to and including the secure-erase fields.
CONFIG = struct.Struct(
    "<Q"      # capacity
    "I"       # size_max
    "I"       # seg_max
    "HBB"     # geometry: cylinders, heads, sectors
    "I"       # blk_size
    "BBHI"    # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "BB"      # writeback, unused0
    "H"       # num_queues
    "III"     # max_discard_sectors, max_discard_seg, discard_sector_alignment
    "II"      # max_write_zeroes_sectors, max_write_zeroes_seg
    "B3x"     # write_zeroes_may_unmap, unused1
    "III"     # max_secure_erase_sectors, max_secure_erase_seg, secure_erase_sector_alignment
)
CONFIG_WRITEBACK_OFFSET = 32
assert CONFIG.size == 72


@dataclass
class BlkConfig:
    capacity: int               # sectors
    size_max: int = 1 << 20
    seg_max: int = 126
    blk_size: int = SECTOR
    physical_block_exp: int = 3
    alignment_offset: int = 0
    min_io_size: int = 1
    opt_io_size: int = 0
    writeback: int = 1
    num_queues: int = 1
    max_discard_sectors: int = 0x3FFFFF
    max_discard_seg: int = 32
    discard_sector_alignment: int = 8
    max_write_zeroes_sectors: int = 0x3FFFFF
    max_write_zeroes_seg: int = 32
    write_zeroes_may_unmap: int = 1
    max_secure_erase_sectors: int = 0x3FFFFF
    max_secure_erase_seg: int = 1
    secure_erase_sector_alignment: int = 8

    def pack(self) -> bytes:
        return CONFIG.pack(
            self.capacity, self.size_max, self.seg_max, 0, 0, 0, self.blk_size,
            self.physical_block_exp, self.alignment_offset, self.min_io_size, self.opt_io_size,
            self.writeback, 0, self.num_queues,
            self.max_discard_sectors, self.max_discard_seg, self.discard_sector_alignment,
            self.max_write_zeroes_sectors, self.max_write_zeroes_seg, self.write_zeroes_may_unmap,
            self.max_secure_erase_sectors, self.max_secure_erase_seg,
            self.secure_erase_sector_alignment)

    @classmethod
    def unpack(cls, data: bytes) -> "BlkConfig":
        v = CONFIG.unpack(data[:CONFIG.size].ljust(CONFIG.size, b"\0"))
        return cls(capacity=v[0], size_max=v[1], seg_max=v[2], blk_size=v[6],
                   physical_block_exp=v[7], alignment_offset=v[8], min_io_size=v[9],
                   opt_io_size=v[10], writeback=v[11], num_queues=v[13],
                   max_discard_sectors=v[14], max_discard_seg=v[15],
                   discard_sector_alignment=v[16], max_write_zeroes_sectors=v[17],
                   max_write_zeroes_seg=v[18], write_zeroes_may_unmap=v[19],
                   max_secure_erase_sectors=v[20], max_secure_erase_seg=v[21],
                   secure_erase_sector_alignment=v[22])
