"""The request table in action: one front-end connection to one device.

Every message is checked against :data:`protocol.REQUEST_SPECS` (header
flags, the protocol feature it belongs to, payload size, fd count, ring
index, memory present) before its handler runs. A bad message gets a
non-zero REPLY_ACK when the front-end asked for one; otherwise the reason is
logged and the connection closed. Nothing a front-end sends can raise past
:meth:`Session.run`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time

from . import protocol
from .connection import BackendConnection
from .message import Message
from .dataplane import DataPlane
from .device import Device
from .errors import ConnectionClosed, FramingError, NativeError, ProtocolError
from .inflight import InflightArea
from .memory import MemoryTable
from .protocol import Feature, ProtocolFeature, Request, bit

log = logging.getLogger(__name__)

#: How long a stop, reset or disconnect waits for requests in flight before
#: it goes on without them: Device.drain_timeout per device, else the
#: environment's VHOSTUSER_DRAIN_TIMEOUT (seconds), else this. Their memory
#: stays safe either way (dataplane.py); only their answers are lost, and a
#: front-end with inflight tracking resubmits them.
DRAIN_TIMEOUT = 30.0
#: How long a message on the back-end channel may wait for the front-end to
#: take it (and a CONFIG_CHANGE_MSG for its REPLY_ACK).
BACKEND_CHANNEL_TIMEOUT = 10.0
#: The features a front-end may change while rings run: QEMU turns dirty
#: logging on and off with SET_FEATURES around a migration.
RUNTIME_FEATURES = bit(Feature.LOG_ALL)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def drain_timeout(device: Device) -> float:
    if device.drain_timeout is not None:
        return device.drain_timeout
    value = os.environ.get("VHOSTUSER_DRAIN_TIMEOUT")
    try:
        return float(value) if value else DRAIN_TIMEOUT
    except ValueError:
        log.warning("VHOSTUSER_DRAIN_TIMEOUT=%r is not a number; using %gs", value, DRAIN_TIMEOUT)
        return DRAIN_TIMEOUT


class Session:
    """State of one front-end connection (features, memory, rings)."""

    def __init__(self, device: Device, conn: BackendConnection):
        self.device = device
        self.conn = conn
        self.name = conn.name
        self.features = 0
        self.protocol_features = 0
        self.protocol_features_set = False     # SET_PROTOCOL_FEATURES received
        self.features_set = False
        # What GET_FEATURES answered: SET_FEATURES is checked against the
        # same (a Python back-end's lifetime() may change its mind between).
        self._offered: int | None = None
        self.owner = False
        self.status = 0
        self.closed = False
        # stop() ran: the session is ending, and rings stay out of service.
        self.stopping = False
        self.dataplane = DataPlane(device.num_queues, queues_per_worker=device.queues_per_worker,
                                   poll_us=device.poll_us,
                                   adaptive_poll_us=device.adaptive_poll_us, name=conn.name)
        self.backend_channel: BackendConnection | None = None
        self._backend_lock = asyncio.Lock()
        # A config change queued and not yet being sent: later ones are
        # coalesced into it (the front-end reads the whole config anyway).
        self._config_pending = False
        self._config_lock = threading.Lock()
        self._ending_io = threading.Lock()     # _end_io, from either thread
        self._loop = asyncio.get_running_loop()
        self.inflight: InflightArea | None = None
        self._handlers = {r: getattr(self, "_on_" + r.name.lower(), None) for r in Request}

    # -- main loop ------------------------------------------------------------
    async def run(self) -> None:
        """Serves messages until the front-end goes away or breaks framing."""
        self.device.on_connect(self)
        try:
            for i, queue in enumerate(self.dataplane.queues):
                self.dataplane.attach(i, self.device.queue_handler(queue))
            self.dataplane.start_workers()
            while True:
                try:
                    msg = await self.conn.recv()
                except ConnectionClosed:
                    log.info("%s: front-end disconnected", self.name)
                    return
                except FramingError as exc:
                    log.error("%s: %s; closing the connection", self.name, exc)
                    return
                if not await self.dispatch(msg):
                    return
        finally:
            try:
                # Requests an async back-end still works on complete into
                # guest memory and the rings, which close() frees: wait first.
                if self.dataplane.inflight():
                    await self.stop("disconnect")
                await self._stop_workers_off_loop()
            finally:
                self.close()

    async def _stop_workers_off_loop(self) -> None:
        """Joins the queues' workers, then waits for the device's I/O still
        in flight (io_uring), from a thread of its own. Storage that stopped
        answering (a Python back-end's plain method blocked in a worker, a
        C file back-end's write into a frozen file system) holds up this
        session's end until it returns, since its rings and guest memory are
        freed only then, but not the event loop: the other exports of a
        vhostuser-daemon and its control socket go on. If this is
        cancelled, close() does both on the loop instead."""
        loop = asyncio.get_running_loop()
        joined = loop.create_future()

        def join() -> None:
            try:
                self._end_io()
            finally:
                with contextlib.suppress(RuntimeError):    # the loop is gone
                    loop.call_soon_threadsafe(_resolve, joined)

        joiner = threading.Thread(target=join, name=f"{self.name} stop", daemon=True)
        joiner.start()
        waiting = drain_timeout(self.device)
        try:
            await asyncio.wait_for(asyncio.shield(joined), waiting)
        except asyncio.TimeoutError:
            log.warning("%s: a queue worker is still inside the back-end %gs after the "
                        "disconnect (a method or I/O that has not returned); the device takes "
                        "a new front-end once it does", self.name, waiting)
            await joined
        # It has only to return now. Left running, it could meet the
        # interpreter's exit, which ends such threads with pthread_exit:
        # that needs libgcc_s, which a sandboxed program can't load.
        joiner.join()

    async def dispatch(self, msg: Message) -> bool:
        """Handles one message; False when the connection must close."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s (%d bytes, %d fds)", self.name, msg.name(), len(msg.payload),
                      len(msg.fds))
        try:
            reply_ack = (msg.need_reply
                         and self.protocol_features & bit(ProtocolFeature.REPLY_ACK))
            try:
                spec = self._check(msg)
                handler = self._handlers.get(protocol.Request(msg.request))
                if handler is None:
                    raise ProtocolError(msg.request, "not supported by this back-end")
                await handler(msg)
            except (ProtocolError, NativeError, OSError, ValueError) as exc:
                # A request with an answer of its own (GET_*) can't be refused
                # with an ack: its reply format has no room for a failure (a
                # non-zero u64 reads as GET_MAX_MEM_SLOTS's or GET_STATUS's
                # value), so it is refused by closing, as without REPLY_ACK.
                answers = protocol.REQUEST_SPECS.get(msg.request)
                ackable = (answers is None or not answers.reply
                           or msg.request in protocol.STATUS_REPLIES)
                if reply_ack and ackable and not isinstance(exc, FramingError):
                    log.warning("%s: %s refused: %s", self.name, msg.name(), exc)
                    await self.conn.reply_u64(msg, 1)
                    return True
                log.error("%s: %s: %s; closing the connection", self.name, msg.name(), exc)
                return False
            if reply_ack and not spec.reply:
                await self.conn.reply_u64(msg, 0)
            return True
        except ConnectionClosed:
            return False
        except Exception:
            # A bug of ours: this connection can't be trusted any more, the
            # process and the other connections go on.
            log.exception("%s: internal error handling %s", self.name, msg.name())
            return False
        finally:
            msg.close_fds()

    def _check(self, msg: Message) -> protocol.RequestSpec:
        try:
            request = protocol.Request(msg.request)
        except ValueError:
            raise ProtocolError(msg.request, "unknown request") from None
        spec = protocol.REQUEST_SPECS.get(request)
        if spec is None:
            raise ProtocolError(request, "not supported by this back-end")
        if (msg.flags & protocol.FLAG_VERSION_MASK) != protocol.VERSION:
            raise ProtocolError(request, f"version flags {msg.flags & 3}")
        if msg.flags & ~protocol.REQUEST_FLAGS:
            raise ProtocolError(request, f"flags {msg.flags:#x}: reserved or reply bits set")
        feature = spec.protocol_feature
        if feature is not None and not self._has_protocol(feature):
            raise ProtocolError(request, f"protocol feature {feature.name} not negotiated")
        if spec.needs_protocol_features and not (self.protocol_features_set or
                                                 self.features & bit(Feature.PROTOCOL_FEATURES)):
            raise ProtocolError(request, "protocol features not negotiated")
        lo, hi = spec.payload
        if not lo <= len(msg.payload) <= hi:
            raise ProtocolError(request, f"payload of {len(msg.payload)} bytes, expected "
                                + (f"{lo}" if lo == hi else f"{lo}..{hi}"))
        flo, fhi = spec.fds
        if not flo <= len(msg.fds) <= fhi:
            raise ProtocolError(request, f"{len(msg.fds)} fds, expected "
                                + (f"{flo}" if flo == fhi else f"{flo}..{fhi}"))
        if spec.needs_memory and len(self.dataplane.memory) == 0:
            raise ProtocolError(request, "no memory table yet")
        return spec

    # -- helpers -----------------------------------------------------------------
    def _ring_index(self, msg: Message, value: int) -> int:
        index = value & protocol.VRING_IDX_MASK if msg.request in _U64_RING_REQUESTS else value
        if index >= self.device.num_queues:
            raise ProtocolError(msg.request, f"ring {index} out of range "
                                f"(device has {self.device.num_queues})")
        return index

    def _u64(self, msg: Message) -> int:
        return protocol.U64.unpack(msg.payload)[0]

    def _state(self, msg: Message) -> tuple[int, int]:
        index, num = protocol.VRING_STATE.unpack(msg.payload)
        return self._ring_index(msg, index), num

    def _has_protocol(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & bit(feature))

    async def stop(self, what: str = "exit") -> None:
        """Takes no new requests from any ring and waits for those in flight
        (a graceful exit, or the front-end went away). Without taking the
        rings out of service first, a guest that keeps writing leaves no
        moment with nothing in flight. The front-end is still read
        meanwhile; no ring is enabled again (_may_enable)."""
        self.stopping = True
        for i in range(self.device.num_queues):
            self.dataplane.set_enabled(i, False)
        await self._drain(what)

    async def _drain(self, what: str, index: int | None = None) -> bool:
        """Waits until no chain is in flight on ring ``index`` (on any ring
        if None; async back-ends finish first), at most the device's drain
        timeout. False when some still are."""
        timeout = drain_timeout(self.device)
        deadline = time.monotonic() + timeout
        while self.dataplane.inflight(index):
            if time.monotonic() > deadline:
                log.error("%s: %d requests still in flight after %gs before %s; going on "
                          "without them (their memory stays mapped until they end, detached "
                          "where the front-end takes it back)", self.name,
                          self.dataplane.inflight(index), timeout, what)
                return False
            await asyncio.sleep(0.001)
        return True

    def _rings_enabled_at_start(self) -> bool:
        # Without PROTOCOL_FEATURES a ring starts enabled (vhost-user.rst,
        # "Ring states"), unless the session is stopping.
        return not self.features & bit(Feature.PROTOCOL_FEATURES) and not self.stopping

    def _may_enable(self, msg: Message, index: int) -> None:
        # A ring enabled while stop() drains would keep the drain from
        # ever seeing none in flight, and run requests on a back-end that
        # is being closed.
        if self.stopping:
            raise ProtocolError(msg.request, f"ring {index}: the back-end is stopping")

    # -- feature negotiation ---------------------------------------------------
    def _offered_features(self) -> int:
        if self._offered is None:
            self._offered = self.device.features() | bit(Feature.PROTOCOL_FEATURES)
        return self._offered

    async def _on_get_features(self, msg):
        await self.conn.reply_u64(msg, self._offered_features())

    async def _on_set_features(self, msg):
        features = self._u64(msg)
        offered = self._offered_features()
        if features & ~offered:
            raise ProtocolError(msg.request, f"features {features & ~offered:#x} were not offered")
        self._check_running_features(msg, features)
        self.features = features
        self.features_set = True
        self.dataplane.set_features(features)
        self.device.on_features(features)

    def _check_running_features(self, msg: Message, features: int) -> None:
        # A running ring and the device read the features without a lock
        # (a net header's length, offloads, the ring's layout): changed
        # under them, the data plane misreads what the guest wrote. The
        # spec sets features before rings start; at a stop they may change.
        changed = (features ^ self.features) & ~RUNTIME_FEATURES
        running = [q.index for q in self.dataplane.queues if q.started]
        if changed and running:
            raise ProtocolError(msg.request, f"features {changed:#x} changed while rings "
                                f"{running} run")

    async def _on_get_protocol_features(self, msg):
        await self.conn.reply_u64(msg, self.device.protocol_features())

    async def _on_set_protocol_features(self, msg):
        features = self._u64(msg)
        if features & ~self.device.protocol_features():
            raise ProtocolError(msg.request, f"protocol features "
                                f"{features & ~self.device.protocol_features():#x} were not offered")
        self.protocol_features = features
        self.protocol_features_set = True
        log.info("%s: protocol features %#x", self.name, features)

    async def _on_set_owner(self, msg):
        self.owner = True

    async def _on_reset_owner(self, msg):
        self.owner = False
        await self._reset_device()

    async def _on_reset_device(self, msg):
        await self._reset_device()

    async def _reset_device(self) -> None:
        # As in stop(): a ring still taking requests could keep the drain
        # from ever seeing none in flight.
        for i in range(self.device.num_queues):
            self.dataplane.set_enabled(i, False)
        await self._drain("reset")
        for i in range(self.device.num_queues):
            self.dataplane.reset_queue(i)
        # Requests the drain gave up on: the driver reset the device under
        # them, so their answers must reach neither its rings nor its buffers.
        orphans = self.dataplane.orphan_requests()
        if orphans:
            log.warning("%s: %d requests orphaned by the reset", self.name, orphans)
        self.features = 0
        self.features_set = False
        self._offered = None
        self.status = 0
        self.dataplane.set_features(0)
        self.device.on_reset()

    async def _on_set_status(self, msg):
        status = self._u64(msg)
        if status > 0xFF:
            raise ProtocolError(msg.request, f"status {status:#x} does not fit a byte")
        if (status & protocol.DeviceStatus.FEATURES_OK) and not self.features_set:
            raise ProtocolError(msg.request, "FEATURES_OK before SET_FEATURES")
        self.status = status

    async def _on_get_status(self, msg):
        await self.conn.reply_u64(msg, self.status)

    async def _on_get_queue_num(self, msg):
        await self.conn.reply_u64(msg, self.device.num_queues)

    # -- memory ----------------------------------------------------------------
    async def _on_set_mem_table(self, msg):
        try:
            regions = protocol.unpack_memory_table(msg.payload)
        except ValueError as exc:
            raise ProtocolError(msg.request, str(exc)) from None
        if len(regions) != len(msg.fds):
            raise ProtocolError(msg.request, f"{len(regions)} regions but {len(msg.fds)} fds")
        # Build the new table aside: a region that fails leaves the old one,
        # and the rings in it, untouched. Regions naming the same pages as
        # the installed table share its mappings (QEMU re-sends unchanged
        # tables); requests in flight keep the old table (dataplane.py), so
        # nothing waits for them: the new table is for new requests at once.
        current = self.dataplane.memory
        table = MemoryTable.create()
        fds, msg.fds = msg.fds, []
        try:
            for i, region in enumerate(regions):
                fd, fds[i] = fds[i], None
                table.add(region, fd, reuse=current)    # closes fd, whatever happens
        except BaseException:
            table.release()
            raise
        finally:
            for fd in fds:
                if fd is not None:
                    os.close(fd)
        broken = self.dataplane.replace_memory(table)
        if broken:
            log.error("%s: rings %s lost their memory with the new table", self.name, broken)
        log.info("%s: memory table with %d regions", self.name, len(regions))

    async def _on_get_max_mem_slots(self, msg):
        await self.conn.reply_u64(msg, protocol.MAX_MEM_SLOTS)

    async def _on_add_mem_reg(self, msg):
        region = protocol.unpack_single_region(msg.payload)
        self.dataplane.add_region(region, msg.take_fd())

    async def _on_rem_mem_reg(self, msg):
        region = protocol.unpack_single_region(msg.payload)
        broken = self.dataplane.remove_region(region)
        if broken:
            log.error("%s: rings %s lived in the removed region", self.name, broken)

    async def _on_set_log_base(self, msg):
        size, offset = protocol.LOG.unpack(msg.payload)
        self.dataplane.set_log(msg.take_fd(), size, offset)
        await self.conn.reply_u64(msg, 0)

    async def _on_set_log_fd(self, msg):
        self.dataplane.set_log_call(msg.take_fd())

    # -- rings -------------------------------------------------------------------
    async def _on_set_vring_num(self, msg):
        index, num = self._state(msg)
        if self.dataplane.queues[index].started:
            raise ProtocolError(msg.request, f"ring {index} is running")
        self.dataplane.set_num(index, num)

    async def _on_set_vring_addr(self, msg):
        a = protocol.VringAddr(*protocol.VRING_ADDR.unpack(msg.payload))
        index = self._ring_index(msg, a.index)
        self.dataplane.set_addr(index, a)

    async def _on_set_vring_base(self, msg):
        index, num = self._state(msg)
        if self.dataplane.queues[index].started:
            raise ProtocolError(msg.request, f"ring {index} is running")
        # Packed rings need the negotiated layout to decode num; QEMU sends
        # SET_FEATURES first.
        self.dataplane.set_base(index, num)

    async def _on_get_vring_base(self, msg):
        index, _ = self._state(msg)
        # Take nothing more from the ring and finish what is in flight, so
        # the index we return is exact.
        self.dataplane.set_enabled(index, False)
        # Only this ring's requests: another ring's slow one must not hold
        # up the stop of this one.
        await self._drain(f"stopping ring {index}", index)
        base = self.dataplane.stop_queue(index)
        log.info("%s: ring %d stopped at %d", self.name, index, base)
        await self.conn.reply(msg, protocol.VRING_STATE.pack(index, base))

    def _ring_fd(self, msg: Message) -> tuple[int, int | None]:
        value = self._u64(msg)
        index = self._ring_index(msg, value)
        nofd = bool(value & protocol.VRING_NOFD_MASK)
        if nofd and msg.fds:
            raise ProtocolError(msg.request, "fd sent with the no-fd flag")
        if not nofd and not msg.fds:
            raise ProtocolError(msg.request, "no fd and no no-fd flag")
        return index, None if nofd else msg.take_fd()

    async def _on_set_vring_kick(self, msg):
        index, fd = self._ring_fd(msg)
        self.dataplane.set_kick(index, fd)
        # The ring starts now (vhost-user.rst: "start ring upon receiving a kick").
        enable = True if self._rings_enabled_at_start() else None
        self.dataplane.start_queue(index, enable=enable)
        vq = self.dataplane.vq(index)
        if vq.resubmit_num:
            log.info("%s: ring %d resubmits %d requests that were in flight",
                     self.name, index, vq.resubmit_num)

    async def _on_set_vring_call(self, msg):
        index, fd = self._ring_fd(msg)
        self.dataplane.set_call(index, fd)

    async def _on_set_vring_err(self, msg):
        index, fd = self._ring_fd(msg)
        self.dataplane.set_err(index, fd)

    async def _on_set_vring_enable(self, msg):
        index, num = self._state(msg)
        if num > 1:
            raise ProtocolError(msg.request, f"enable value {num}")
        if num:
            self._may_enable(msg, index)
        self.dataplane.set_enabled(index, bool(num))

    async def _on_vring_kick(self, msg):
        index, _ = self._state(msg)
        self.dataplane.kick(index)

    # -- config, device specific -------------------------------------------------
    async def _on_get_config(self, msg):
        offset, size, flags = protocol.CONFIG_HEADER.unpack_from(msg.payload)
        space = self.device.config_space()
        if size > protocol.CONFIG_MAX or offset + size > len(space):
            # QEMU reads a reply without payload as a failure.
            log.warning("%s: GET_CONFIG offset %d size %d beyond %d-byte config space",
                        self.name, offset, size, len(space))
            await self.conn.reply(msg, b"")
            return
        await self.conn.reply(msg, protocol.CONFIG_HEADER.pack(offset, size, flags)
                              + space[offset:offset + size])

    async def _on_set_config(self, msg):
        offset, size, flags = protocol.CONFIG_HEADER.unpack_from(msg.payload)
        data = msg.payload[protocol.CONFIG_HEADER.size:]
        if size != len(data):
            raise ProtocolError(msg.request, f"size {size} but {len(data)} bytes of payload")
        await self.device.set_config(offset, data, flags)

    async def _on_send_rarp(self, msg):
        self.device.send_rarp(msg.payload[:6])

    async def _on_net_set_mtu(self, msg):
        self.device.set_mtu(self._u64(msg))

    async def _on_set_backend_req_fd(self, msg):
        fd = msg.take_fd()
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise
        if sock.family != socket.AF_UNIX:
            sock.close()
            raise ProtocolError(msg.request, "back-end channel is not a unix socket")
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = BackendConnection(sock, name=f"{self.name} back-end channel")

    # -- inflight tracking --------------------------------------------------------
    async def _on_get_inflight_fd(self, msg):
        size, offset, num_queues, queue_size = protocol.INFLIGHT.unpack_from(msg.payload)
        area = InflightArea.create(num_queues, queue_size)
        try:
            await self.conn.reply(msg, protocol.INFLIGHT.pack(area.size, 0, num_queues, queue_size)
                                  + b"\0" * (len(msg.payload) - protocol.INFLIGHT.size),
                                  fds=[area.fd])
        finally:
            # The front-end hands it back with SET_INFLIGHT_FD.
            area.close_mapping()

    async def _on_set_inflight_fd(self, msg):
        size, offset, num_queues, queue_size = protocol.INFLIGHT.unpack_from(msg.payload)
        if num_queues > self.device.num_queues:
            raise ProtocolError(msg.request, f"{num_queues} queues, device has "
                                f"{self.device.num_queues}")
        try:
            area = InflightArea.map(msg.take_fd(), size, offset, num_queues, queue_size)
        except (ValueError, OSError) as exc:
            # An area we cannot use (another version's layout, a short fd)
            # must not stop the device: it only loses crash recovery.
            log.warning("%s: inflight area not used: %s; requests in flight at a crash "
                        "will not be resubmitted", self.name, exc)
            return
        try:
            # Every ring now points into the new area or nowhere, or (a ring
            # running) nothing changed: only then may the old one go.
            self.dataplane.set_inflight(area)
        except BaseException:
            area.close_mapping()
            raise
        if self.inflight is not None:
            self.inflight.close_mapping()
        self.inflight = area
        log.info("%s: inflight area of %d bytes for %d queues of %d", self.name, size,
                 num_queues, queue_size)

    # -- back-end channel -----------------------------------------------------------
    def notify_config_change(self) -> bool:
        """Queues CONFIG_CHANGE_MSG to the front-end; False if there is no
        channel to send it on. Callable from any thread."""
        if self.backend_channel is None or not self._has_protocol(ProtocolFeature.CONFIG):
            return False
        with self._config_lock:
            if self._config_pending:
                return True     # the one queued tells of this change too
            self._config_pending = True
        coro = self._send_config_change()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._loop.create_task(coro)
        else:
            asyncio.run_coroutine_threadsafe(coro, self._loop)
        return True

    async def _send_config_change(self) -> None:
        # Not awaited by the caller: the front-end typically answers with a
        # GET_CONFIG on the main socket before it acks, which needs our loop.
        # At most one waits here besides the one being sent: a change after
        # this one's send began needs a message of its own.
        async with self._backend_lock:
            with self._config_lock:
                self._config_pending = False
            ack = await self._backend_request(protocol.BackendRequest.CONFIG_CHANGE_MSG)
        if ack:
            log.warning("%s: front-end refused the config change", self.name)

    async def _backend_request(self, request: protocol.BackendRequest,
                               payload: bytes = b"") -> int | None:
        """Sends ``request`` on the back-end channel and, with REPLY_ACK,
        waits for its ack. Returns the ack's value (0 without REPLY_ACK),
        None when there is no channel or it failed. Replies carry no id of
        their own: after a timeout, a late one would be read as the next
        request's, so any request that fails to complete in step closes the
        channel. Called with the back-end lock held."""
        channel = self.backend_channel
        if channel is None:
            return None
        need_reply = self._has_protocol(ProtocolFeature.REPLY_ACK)
        flags = protocol.VERSION | (protocol.FLAG_NEED_REPLY if need_reply else 0)
        try:
            await asyncio.wait_for(channel.send(request, payload, flags=flags),
                                   BACKEND_CHANNEL_TIMEOUT)
            if not need_reply:
                return 0
            reply = await asyncio.wait_for(channel.recv(), BACKEND_CHANNEL_TIMEOUT)
            reply.close_fds()
            return self._backend_ack(request, reply)
        except asyncio.TimeoutError:
            self._drop_backend_channel(channel, f"the front-end did not answer "
                                       f"{request.name} within {BACKEND_CHANNEL_TIMEOUT:g} s")
        except (ConnectionClosed, ProtocolError, OSError) as exc:     # FramingError too
            self._drop_backend_channel(channel, f"{request.name}: "
                                       f"{exc or type(exc).__name__}")
        return None

    @staticmethod
    def _backend_ack(request: protocol.BackendRequest, reply: Message) -> int:
        """The value of ``reply`` as the ack of ``request``."""
        if (reply.request != request or not reply.flags & protocol.FLAG_REPLY
                or len(reply.payload) != protocol.U64.size):
            # (reply.request numbers a back-end request, not a Request)
            raise ProtocolError(None, f"reply {reply.request} is no ack of {request.name} "
                                f"(flags {reply.flags:#x}, {len(reply.payload)} bytes)")
        return protocol.U64.unpack(reply.payload)[0]

    def _drop_backend_channel(self, channel: BackendConnection, why: str) -> None:
        # Part of a message may be out, or a reply still due: the channel
        # is out of step for good, and later requests go unsent.
        log.error("%s: back-end channel: %s; closed", self.name, why)
        channel.close()
        if self.backend_channel is channel:
            self.backend_channel = None

    # -- teardown ----------------------------------------------------------------------
    def _end_io(self) -> None:
        """Joins the workers, then waits for the device's I/O still in
        flight, before guest memory is unmapped. Any thread; a second caller
        (close() after a cancelled join) waits for the first, so the two
        never drain the device's io_uring rings at once."""
        with self._ending_io:
            self.dataplane.stop_workers()
            self.device.quiesce()

    def close(self) -> None:
        """Tears the session down; every step runs even if one before it
        failed, so the device is always free for the next front-end."""
        self.closed = True
        try:
            self._end_io()      # done already, off the loop, unless cancelled
            orphans = self.dataplane.close()
            if orphans:
                log.warning("%s: %d requests still running at disconnect: their guest memory "
                            "is detached, their answers will be dropped", self.name, orphans)
        finally:
            try:
                if self.backend_channel is not None:
                    self.backend_channel.close()
                    self.backend_channel = None
                if self.inflight is not None:
                    # Unmapped after the rings stopped; the front-end keeps its
                    # fd, so a reconnecting back-end gets the state back.
                    inflight, self.inflight = self.inflight, None
                    inflight.close_mapping()
            finally:
                self.conn.close()
                self.device.on_disconnect(self)


_U64_RING_REQUESTS = {Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR}
