"""POSIX shared-memory segments with owner-only permissions and unique names.

Opened through /dev/shm directly rather than multiprocessing.shared_memory,
whose resource tracker would unlink the segment when any process that merely
attached to it exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import secrets

from tilert.engine.channel.layout import (
    COMMAND_OFFSET,
    HEADER_OFFSET,
    MAGIC,
    PROMPT_OFFSET,
    RING_SLOTS,
    Command,
    Header,
    TokenRecord,
    ring_offset,
    segment_size,
)

SHM_DIR = "/dev/shm"


def unique_name(tag: str = "") -> str:
    # Unique per server instance and per worker generation: the pid keeps two
    # servers apart, the random part keeps restarts and pid reuse apart.
    return f"tilert-{os.getpid()}-{tag}{secrets.token_hex(6)}"


class Segment:
    """A mapped channel segment. The server creates it; workers attach."""

    def __init__(self, name: str, fd: int, size: int, owner: bool) -> None:
        self.name = name
        self.owner = owner
        self._mm = mmap.mmap(fd, size)
        os.close(fd)
        self.header = Header.from_buffer(self._mm, HEADER_OFFSET)
        self.command = Command.from_buffer(self._mm, COMMAND_OFFSET)
        cap = self.header.prompt_capacity if not owner else 0
        self._cap = cap
        self.prompt = None  # set by _bind
        self.ring = None

    def _bind(self, prompt_capacity: int, ring_slots: int) -> None:
        self._cap = prompt_capacity
        self.prompt = (ctypes.c_uint32 * prompt_capacity).from_buffer(self._mm, PROMPT_OFFSET)
        self.ring = (TokenRecord * ring_slots).from_buffer(self._mm, ring_offset(prompt_capacity))

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @classmethod
    def create(cls, prompt_capacity: int, world_size: int = 1, tag: str = "") -> Segment:
        name = unique_name(tag)
        size = segment_size(prompt_capacity)
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(os.path.join(SHM_DIR, name))
            raise
        seg = cls(name, fd, size, owner=True)
        h = seg.header
        h.ring_slots = RING_SLOTS
        h.prompt_capacity = prompt_capacity
        h.world_size = world_size
        h.magic = MAGIC  # last: a worker that sees the magic sees the rest
        seg._bind(prompt_capacity, RING_SLOTS)
        return seg

    @classmethod
    def attach(cls, name: str) -> Segment:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        size = os.fstat(fd).st_size
        seg = cls(name, fd, size, owner=False)
        if seg.header.magic != MAGIC:
            seg.close()
            raise RuntimeError(f"shared-memory segment {name} has an unknown layout")
        seg._bind(seg.header.prompt_capacity, seg.header.ring_slots)
        return seg

    def set_error(self, message: str) -> None:
        data = message.encode("utf-8", "replace")[: ctypes.sizeof(self.header.error) - 1]
        self.header.error = data
        self.header.error_len = len(data)

    def error(self) -> str:
        return bytes(self.header.error[: self.header.error_len]).decode("utf-8", "replace")

    def close(self) -> None:
        # ctypes views pin the buffer; drop them before closing the map.
        self.header = self.command = self.prompt = self.ring = None  # type: ignore[assignment]
        with contextlib.suppress(BufferError):
            self._mm.close()

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
