"""Indirect descriptor tables that straddle two memory regions.

Regions adjacent in guest-physical memory are separate mappings here, so a
table crossing the edge has no contiguous host address. It is as valid as
any other table (the spec only asks it to be contiguous in guest memory),
and the rings read it through a gathered copy. Found by the property test
test_rings.py::test_valid_chains_arrive_exactly_as_written.
"""
import pytest

from vhostuser.native import lib
from vhostuser_devkit.ringlab import Lab


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("before", [8, 16, 40, 112])
def test_indirect_table_across_a_region_edge(packed, before):
    lab = Lab(nqueues=1, packed=packed, size=64)
    try:
        bufs = []
        for i in range(8):
            gpa = lab.alloc(64)
            lab.write(gpa, bytes([i]) * 64)
            bufs.append((gpa, 64, i >= 6))
        table = lab.alloc_across_edge(16 * len(bufs), before=before)
        assert table is not None
        if packed:
            lab.add_packed_chain(0, bufs, 7, indirect=True, table_at=table)
        else:
            head = lab.add_split_chain(0, bufs, indirect=True, table_at=table)
            lab.publish_split(0, [head])
        rc, elem = lab.pop(0)
        assert rc == 1, lib.vu_strerror(rc)
        assert not lab.vq(0).broken
        assert lab.elem_bytes(elem, writable=False) == [bytes([i]) * 64 for i in range(6)]
        assert (elem.out_num, elem.in_num, elem.in_len) == (6, 2, 128)
    finally:
        lab.close()
