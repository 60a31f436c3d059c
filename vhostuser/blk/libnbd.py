"""libnbd's C API, loaded with cffi in ABI mode.

No compiler and no headers at run time: Debian's libnbd0 is enough. Only the
calls the NBD back-end makes are declared, by hand, after libnbd 1.14's
<libnbd.h>. The library is opened on first use, so this module imports
where libnbd isn't installed.
"""
from __future__ import annotations

import errno
import os

import cffi

from .backends import BackendError

_CDEF = """
struct nbd_handle;

typedef struct {
    int (*callback)(void *user_data, int *error);
    void *user_data;
    void (*free)(void *user_data);
} nbd_completion_callback;

struct nbd_handle *nbd_create(void);
void nbd_close(struct nbd_handle *h);
const char *nbd_get_error(void);
int nbd_get_errno(void);

int nbd_set_request_structured_replies(struct nbd_handle *h, bool request);
int nbd_set_pread_initialize(struct nbd_handle *h, bool request);

int nbd_aio_connect_uri(struct nbd_handle *h, const char *uri);
int nbd_aio_disconnect(struct nbd_handle *h, uint32_t flags);
int nbd_aio_get_fd(struct nbd_handle *h);
unsigned nbd_aio_get_direction(struct nbd_handle *h);
int nbd_aio_notify_read(struct nbd_handle *h);
int nbd_aio_notify_write(struct nbd_handle *h);
int nbd_aio_is_connecting(struct nbd_handle *h);
int nbd_aio_is_negotiating(struct nbd_handle *h);
int nbd_aio_is_ready(struct nbd_handle *h);
int nbd_aio_is_processing(struct nbd_handle *h);
int nbd_aio_is_dead(struct nbd_handle *h);
int nbd_aio_is_closed(struct nbd_handle *h);
int nbd_aio_in_flight(struct nbd_handle *h);

int64_t nbd_get_size(struct nbd_handle *h);
int64_t nbd_get_block_size(struct nbd_handle *h, int size_type);
int nbd_is_read_only(struct nbd_handle *h);
int nbd_can_flush(struct nbd_handle *h);
int nbd_can_fua(struct nbd_handle *h);
int nbd_can_trim(struct nbd_handle *h);
int nbd_can_zero(struct nbd_handle *h);
int nbd_can_multi_conn(struct nbd_handle *h);

int64_t nbd_aio_pread(struct nbd_handle *h, void *buf, size_t count, uint64_t offset,
                      nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_pwrite(struct nbd_handle *h, const void *buf, size_t count, uint64_t offset,
                       nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_flush(struct nbd_handle *h, nbd_completion_callback completion_callback,
                      uint32_t flags);
int64_t nbd_aio_trim(struct nbd_handle *h, uint64_t count, uint64_t offset,
                     nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_zero(struct nbd_handle *h, uint64_t count, uint64_t offset,
                     nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_peek_command_completed(struct nbd_handle *h);
int nbd_aio_command_completed(struct nbd_handle *h, uint64_t cookie);
"""

# Values from <libnbd.h>.
DIRECTION_READ = 1
DIRECTION_WRITE = 2
CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02
SIZE_MAXIMUM = 2

#: errno values that mean the connection, not the request, failed: the
#: request goes again on a new connection.
TRANSPORT_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE,
                              errno.ESHUTDOWN, errno.ECONNABORTED, errno.ETIMEDOUT,
                              errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOENT})

SONAME = "libnbd.so.0"


class NbdUnavailable(BackendError):
    """libnbd isn't installed (Debian: libnbd0)."""


class NbdError(BackendError):
    """libnbd or the server refused or failed a request."""

    def __init__(self, message: str, err: int = 0):
        super().__init__(message)
        self.errno = err


ffi = cffi.FFI()
ffi.cdef(_CDEF)
_lib = None


def lib():
    """The loaded library (opened once)."""
    global _lib
    if _lib is None:
        try:
            _lib = ffi.dlopen(SONAME)
        except OSError as exc:
            raise NbdUnavailable(f"{SONAME} can't be loaded ({exc}); install libnbd0") from None
    return _lib


def available() -> bool:
    try:
        lib()
    except NbdUnavailable:
        return False
    return True


def last_error(what: str) -> NbdError:
    """The calling thread's libnbd error as an exception."""
    lb = lib()
    err = lb.nbd_get_errno()
    msg = lb.nbd_get_error()
    text = ffi.string(msg).decode(errors="replace") if msg != ffi.NULL else (
        os.strerror(err) if err else "unknown error")
    return NbdError(f"{what}: {text}", err)


#: Passed for "no completion callback": we collect completions with
#: nbd_aio_peek_command_completed instead, so no Python runs inside libnbd.
_NO_CALLBACK = ffi.new("nbd_completion_callback *")
NO_CALLBACK = _NO_CALLBACK[0]     # a view into _NO_CALLBACK, which must stay referenced
