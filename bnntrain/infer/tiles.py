"""Output positions in tiles, as the tiled kernels (`nibbles.binary_conv_nibbles`,
`stem_conv.direct_conv`) walk them: positions row by row through the batch, a tile a few
consecutive positions, work units tiles by blocks of output channels."""
from __future__ import annotations

from numba import njit


@njit(cache=True, inline="always")
def _position(p, plane, ow):
    n = p // plane
    oy = (p - n * plane) // ow
    return n, oy, p - n * plane - oy * ow


@njit(cache=True, inline="always")
def _next_position(n, oy, ox, oh, ow):
    # The output position after (n, oy, ox), row by row through the batch.
    if ox + 1 < ow:
        return n, oy, ox + 1
    if oy + 1 < oh:
        return n, oy + 1, 0
    return n + 1, 0, 0


@njit(cache=True, inline="always")
def _unit(unit, group, blocks, tiles, tile_positions):
    # Work unit `unit`'s (block of channels, first output position): units go in groups of
    # `group` tiles by all blocks, block by block within a group, so that a thread reads one
    # block's weights for several tiles in a row.
    span = unit // (group * blocks)
    size = min(group, tiles - span * group)
    rest = unit - span * group * blocks
    block = rest // size
    return block, (span * group + rest - block * size) * tile_positions


@njit(cache=True, inline="always")
def _tile_offsets(offsets, first, count, oh, ow, hp, wp, stride_h, stride_w, per_position):
    # offsets[j]: where output position first + j's window starts in a padded NHWC input of
    # hp x wp positions of `per_position` elements; a last tile's spare lanes (j >= count)
    # repeat its last position.
    n, oy, ox = _position(first, oh * ow, ow)
    for j in range(offsets.shape[0]):
        if j < count:
            offsets[j] = ((n * hp + oy * stride_h) * wp + ox * stride_w) * per_position
            n, oy, ox = _next_position(n, oy, ox, oh, ow)
        else:
            offsets[j] = offsets[count - 1]
