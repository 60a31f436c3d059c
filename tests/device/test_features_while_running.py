"""SET_FEATURES while rings run (vhost-user.rst: features are set before
rings start). A hostile front-end's change would move what the data plane
reads under it (a net header of 12 bytes becoming 10): refused, except
for LOG_ALL, which QEMU turns on and off around a migration."""
import pytest

from vhostuser.frontend import GuestMemory
from vhostuser.frontend.connection import ReplyError
from vhostuser.frontend.device import DEFAULT_FEATURES
from vhostuser.net import NetDevice, SinkBackend
from vhostuser.protocol import Feature, bit


def running_net(fe):
    fe.negotiate(DEFAULT_FEATURES)
    mem = fe.own(GuestMemory([(0, 4 << 20)], name="net"))
    fe.set_mem_table(mem)
    return [fe.setup_queue(i, 64, mem=mem) for i in range(2)]


def test_a_feature_change_while_rings_run_is_refused(serve):
    device = NetDevice(SinkBackend())
    with serve(device) as (srv, fe):
        running_net(fe)
        assert device._net.hdr_len == 12
        with pytest.raises(ReplyError):
            fe.set_features(fe.features & ~bit(Feature.VERSION_1))
        assert device._net.hdr_len == 12
        assert srv.device.session.features & bit(Feature.VERSION_1)


def test_log_all_may_change_while_rings_run(serve):
    device = NetDevice(SinkBackend())
    with serve(device) as (srv, fe):
        running_net(fe)
        fe.set_features(fe.features | bit(Feature.LOG_ALL))
        fe.set_features(fe.features & ~bit(Feature.LOG_ALL))
        fe.set_features(fe.features)                 # the same again: no change


def test_features_may_change_once_the_rings_stop(serve):
    device = NetDevice(SinkBackend())
    with serve(device) as (srv, fe):
        running_net(fe)
        for i in range(2):
            fe.stop_queue(i)
        fe.set_features(fe.features & ~bit(Feature.VERSION_1))
        assert device._net.hdr_len == 10
