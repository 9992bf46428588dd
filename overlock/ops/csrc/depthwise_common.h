/* Index arithmetic shared by the 256-bit (depthwise_avx2.c) and 512-bit (depthwise_avx512.c) depthwise loops, which
 * must cut the work the same way to give the same bits. */
#ifndef OVERLOCK_DEPTHWISE_COMMON_H
#define OVERLOCK_DEPTHWISE_COMMON_H

/* The first tap index t >= 0 with t * d >= n (n may be negative). */
static inline int first_tap(int n, int d) { return n <= 0 ? 0 : (n + d - 1) / d; }

/* The weight gradient's passes over a row of output pixels for a tile of taps whose column offsets run from `first`
 * to `last` (dilation applied): pixels [from[1], to[1]) read inside the map for every tap of the tile and run
 * unchecked; passes 0 and 2, on either side, check tap by tap. */
static inline void wgrad_passes(int W, int pw, int first, int last, int from[3], int to[3]) {
    const int any_lo = pw - last > 0 ? pw - last : 0, any_hi = W + pw - first < W ? W + pw - first : W;
    int lo = pw - first > 0 ? pw - first : 0, hi = W + pw - last < W ? W + pw - last : W;
    if (lo > hi) lo = hi = any_hi;
    from[0] = any_lo, to[0] = lo;
    from[1] = lo, to[1] = hi;
    from[2] = hi > any_lo ? hi : any_lo, to[2] = any_hi;
}

#endif
