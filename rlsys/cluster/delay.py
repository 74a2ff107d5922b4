"""A node's link with delay, where the kernel has no tc netem: a relay between the node's link and
the bridge that holds every frame the node sends for a fixed time before passing it on.

Isolation.delay() runs it in the cluster's switch namespace: the node's veth end leaves the bridge,
a TAP device takes its place, and this process copies frames between the two. Frames from the node
(its egress, as netem on its eth0 would delay) wait `delay_ms`; frames to the node pass at once.
Order is kept (one FIFO, one fixed delay). A frame that finds the way out full (the socket's
send buffer, the TAP's queue) is dropped, as a full queue on a real link drops it; TCP resends. Both sockets carry the virtio-net header, so the large
segments that veth passes (TSO/GSO, up to 64 KiB) cross whole instead of one MTU at a time, and
checksums left to offload stay so.

What it costs: one Python process per delayed node, a read and a write per frame; at test scale
(tens of MB a run) that is a few percent of a core. A frame that would wait behind more than
`limit` others is dropped, as netem's queue limit does.

    python -m rlsys.cluster.delay <veth end> <tap name> <delay ms>   # prints "ready", runs until killed
"""

from __future__ import annotations

import collections
import fcntl
import functools
import os
import selectors
import socket
import struct
import sys
import time

TUNSETIFF, TUNSETOFFLOAD = 0x400454CA, 0x400454D0
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
SOL_PACKET, PACKET_VNET_HDR, PACKET_IGNORE_OUTGOING = 263, 15, 23
ETH_P_ALL = 0x0003
FRAME = 65536 + 64  # a GSO segment, its Ethernet and virtio-net headers


def open_tap(name: str) -> int:
    """A TAP device that takes and gives frames with a virtio-net header, large segments allowed."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    return fd


def open_link(name: str) -> socket.socket:
    """A raw socket on the node's veth end: frames it receives (the node's sends) with their
    virtio-net header; frames written go out to the node. Its own writes are not read back."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.bind((name, 0))
    sock.setblocking(False)
    return sock


def send(write, frame: bytes) -> None:
    """Pass a frame on; dropped when the way out is full (non-blocking: the relay never stalls)."""
    try:
        write(frame)
    except BlockingIOError:
        pass


def relay(link: socket.socket, tap: int, delay_s: float, limit: int = 10_000) -> None:
    held: collections.deque[tuple[float, bytes]] = collections.deque()  # (due, frame) from the node
    to_bridge = functools.partial(os.write, tap)
    sel = selectors.DefaultSelector()
    sel.register(link, selectors.EVENT_READ, "link")
    sel.register(tap, selectors.EVENT_READ, "tap")
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now:  # due: on to the bridge
            send(to_bridge, held.popleft()[1])
        for key, _ in sel.select(timeout=max(0.0, held[0][0] - now) if held else None):
            for _ in range(64):  # drain a burst, then look at the clock again
                try:
                    frame = link.recv(FRAME) if key.data == "link" else os.read(tap, FRAME)
                except BlockingIOError:
                    break
                if key.data == "tap":
                    send(link.send, frame)  # to the node: no delay
                elif len(held) < limit:
                    held.append((time.monotonic() + delay_s, frame))


def main(argv: list[str]) -> None:
    veth, tap_name, delay_ms = argv[0], argv[1], float(argv[2])
    link, tap = open_link(veth), open_tap(tap_name)
    print("ready", flush=True)
    relay(link, tap, delay_ms / 1000)


if __name__ == "__main__":
    main(sys.argv[1:])
