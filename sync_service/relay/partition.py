"""Kafka's default partition of a keyed record: murmur2 of the key, as the Java client has it.

Every client must agree on this rule, or one aggregate's events could land on two
partitions; a unit test holds it equal to aiokafka's murmur2 for keys of any length.
"""

from __future__ import annotations

import struct

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_WORDS = struct.Struct("<I").iter_unpack
"""Whole little-endian 32-bit words, unpacked in C: aiokafka assembles each from four
byte lookups and a dozen masks, which makes its murmur2 cost 1.4 to 2 times this one."""


def murmur2(key: bytes) -> int:
    """MurmurHash2 (seed 0x9747b28c) of `key`, as an unsigned 32-bit int."""
    length = len(key)
    h = _SEED ^ length
    whole = length & ~3
    for (k,) in _WORDS(key[:whole]):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    left = length & 3
    if left:
        if left == 3:
            h ^= key[whole + 2] << 16
        if left >= 2:
            h ^= key[whole + 1] << 8
        h = ((h ^ key[whole]) * _M) & _MASK
    h = ((h ^ (h >> 13)) * _M) & _MASK
    return h ^ (h >> 15)


def partition_index(key: bytes, count: int) -> int:
    """The index of `key`'s partition among `count` partitions sorted by id (Kafka's
    DefaultPartitioner: the hash's sign bit dropped, modulo the count)."""
    return (murmur2(key) & 0x7FFFFFFF) % count
