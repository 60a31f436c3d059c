"""vhostuser-blkload command line (also ``python -m vhostuser.blkload``)."""
from __future__ import annotations

import argparse
import json
import sys

from ..cli import common
from . import RW_MODES, parse_size, prefill, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhostuser-blkload",
        description="Drive any vhost-user-blk back-end over its socket and report IOPS, "
                    "MB/s, latency percentiles and the back-end's CPU time and peak RSS.")
    common.add_version_option(p)
    p.add_argument("--socket", metavar="PATH")
    p.add_argument("--rw", choices=list(RW_MODES), default="randread")
    p.add_argument("--bs", default="4k", help="block size (default 4k)")
    p.add_argument("--qd", type=int, default=32, help="requests in flight per queue")
    p.add_argument("--queues", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of the same load before measuring (default min(1, seconds/5))")
    p.add_argument("--rwmixread", type=int, default=50, help="randrw: percentage of reads")
    p.add_argument("--verify", action="store_true",
                   help="writes stamp each sector; reads check stamps (image made by "
                        "--make-image or --prefill)")
    p.add_argument("--spin", action="store_true",
                   help="busy-poll the used ring instead of sleeping on the call eventfd")
    p.add_argument("--no-event-idx", action="store_true", help="do not negotiate EVENT_IDX")
    p.add_argument("--no-flush", action="store_true",
                   help="do not negotiate VIRTIO_BLK_F_FLUSH (nor CONFIG_WCE): the device must "
                        "then make every write stable before completing it. By default FLUSH "
                        "is negotiated, as Linux does, and the device may cache writes")
    p.add_argument("--write-through", action="store_true",
                   help="negotiate FLUSH and CONFIG_WCE, then set the config space's writeback "
                        "to 0 (what Linux does for 'write through' in queue/write_cache)")
    p.add_argument("--flush-every", type=int, default=0, metavar="N",
                   help="send a FLUSH after every N writes (counted apart, not in IOPS)")
    p.add_argument("--span", help="only address the first SPAN bytes of the disk")
    p.add_argument("--pid", type=int, help="back-end pid (default: found from the socket)")
    p.add_argument("--prefill", action="store_true",
                   help="write every sector once, stamped, and exit")
    p.add_argument("--make-image", metavar="PATH",
                   help="write a stamped raw image of --image-size at PATH and exit")
    p.add_argument("--image-size", default="1G")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _human(r: dict) -> str:
    lat = r["lat_us"]
    lines = [
        f"{r['rw']} bs={r['bs']} qd={r['qd']} queues={r['queues']} wait={r['wait']} "
        f"event_idx={r['event_idx']} flush={r['flush_negotiated']} cache={r['cache_mode']}",
        *([f"  flushes {r['flushes']} (one per {r['flush_every']} writes), mean latency "
           f"{r['flush_lat_us_mean']} us"] if r["flush_every"] else []),
        f"  IOPS {r['iops']:.0f}   {r['mbps']:.1f} MB/s   ios {r['ios']}   errors {r['errors']}"
        + (f"   verify errors {r['verify_errors']}" if r["verify"] else ""),
        f"  latency us: mean {lat['mean']}  p50 {lat['p50']}  p99 {lat['p99']}  "
        f"p99.9 {lat['p99.9']}  max {lat['max']}",
        f"  client CPU {r['client_cpu_s']} s over {r['elapsed_s']} s; kicks {r['kicks']} "
        f"calls {r['calls']} sleeps {r['sleeps']}",
    ]
    b = r.get("backend")
    if b:
        lines.append(f"  back-end pid {b['pid']}: CPU {b['cpu_s']} s ({b['cpu_pct']}%), "
                     f"{b['cpu_us_per_io']} us/IO, peak RSS {b['peak_rss_kb'] / 1024:.1f} MiB")
    if r.get("error"):
        lines.append(f"  ERROR: {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.make_image:
            from . import stamp_file
            stamp_file(args.make_image, parse_size(args.image_size))
            return 0
        if not args.socket:
            raise ValueError("--socket is required")
        if args.prefill:
            out = prefill(args.socket, span=args.span)
            print(json.dumps(out) if args.json else
                  f"prefilled {out['bytes']} bytes in {out['elapsed_s']:.2f} s")
            return 0 if not out["errors"] else 1
        r = run(args.socket, rw=args.rw, bs=args.bs, qd=args.qd, queues=args.queues,
                seconds=args.seconds, warmup=args.warmup, rwmixread=args.rwmixread,
                verify=args.verify, spin=args.spin, event_idx=not args.no_event_idx,
                pid=args.pid, span=args.span, flush=not args.no_flush,
                write_through=args.write_through, flush_every=args.flush_every)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"vhostuser-blkload: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(r) if args.json else _human(r))
    return 1 if r.get("error") or r["errors"] or r["verify_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
