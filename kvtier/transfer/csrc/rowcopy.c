/* kvtier CPU row copies: row i of a job moves `len` bytes from src[i] to dst[i].
 *
 * The CPU path's rows are 4-32 KiB pieces of KV cache scattered over many tensors. Copied one
 * after the other, each row starts cold: the hardware prefetchers stop at 4 KiB page bounds,
 * so every row pays a full memory latency before its bytes stream. Here the next rows' source
 * lines are prefetched while the current row is copied, and (x86-64) rows are written with
 * non-temporal stores: a job is far larger than the caches, and write-allocating the target
 * lines would read every byte written once more.
 *
 * Plain C ABI, loaded through ctypes (kvtier/transfer/native.py), which releases the GIL
 * around each call. No allocation, no state: safe to call from several threads on disjoint
 * rows. The caller guarantees every address is valid for `len` bytes.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define KVTIER_STREAM 1
#endif

/* Rows prefetched ahead of the one being copied (4 KiB rows: 1-2 measured best). */
#define AHEAD 2
/* Bytes of a row prefetched: a whole 4-8 KiB row; of larger rows their start, after which the
 * hardware prefetcher keeps up within each page. */
#define PREFETCH_BYTES 8192

static void prefetch_row(const char *p, int64_t len) {
    int64_t end = len < PREFETCH_BYTES ? len : PREFETCH_BYTES;
    for (int64_t o = 0; o < end; o += 64) __builtin_prefetch(p + o, 0, 0);
}

/* Checked by the loader against the Python side it was built for. */
int kvtier_native_version(void) { return 3; }

void kvtier_copy_rows(const int64_t *dst, const int64_t *src, int64_t n, int64_t len,
                      int nontemporal) {
    for (int64_t i = 0; i < n && i < AHEAD; i++) prefetch_row((const char *)src[i], len);
    for (int64_t i = 0; i < n; i++) {
        if (i + AHEAD < n) prefetch_row((const char *)src[i + AHEAD], len);
        char *d = (char *)(intptr_t)dst[i];
        const char *s = (const char *)(intptr_t)src[i];
#ifdef KVTIER_STREAM
        if (nontemporal && ((uintptr_t)d & 15) == 0 && (len & 63) == 0) {
            for (int64_t o = 0; o < len; o += 64) {
                __m128i a = _mm_loadu_si128((const __m128i *)(s + o));
                __m128i b = _mm_loadu_si128((const __m128i *)(s + o + 16));
                __m128i c = _mm_loadu_si128((const __m128i *)(s + o + 32));
                __m128i e = _mm_loadu_si128((const __m128i *)(s + o + 48));
                _mm_stream_si128((__m128i *)(d + o), a);
                _mm_stream_si128((__m128i *)(d + o + 16), b);
                _mm_stream_si128((__m128i *)(d + o + 32), c);
                _mm_stream_si128((__m128i *)(d + o + 48), e);
            }
            continue;
        }
#endif
        memcpy(d, s, (size_t)len);
    }
#ifdef KVTIER_STREAM
    if (nontemporal) _mm_sfence(); /* streamed lines are visible before the caller returns */
#endif
}
