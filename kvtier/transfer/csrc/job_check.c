/* kvtier copy-job argument check: the one pass a job's blocks and slots get before any copy.
 *
 * A submit is on the critical path of a transfer (no copy starts before it returns). The same
 * checks in numpy cost a sort and several calls of microseconds each, 0.1-0.25 ms per job on
 * the GPU hosts measured; here they are one call. kvtier.transfer.job_args keeps the numpy
 * version as the fallback and the tests hold both to the same answers.
 */
#include <stdint.h>
#include <stdlib.h>

enum { JOB_OK = 0, WRITTEN_RANGE = 1, OTHER_RANGE = 2, WRITTEN_TWICE = 3, NO_MEMORY = 4 };

/* 0 when every written[i] lies in [0, w_limit) and appears once and every other[i] lies in
 * [0, o_limit); else the first failure's code above (range before duplicates, written side
 * before the other, as the numpy version reports them). */
int kvtier_check_job(const int64_t *written, int64_t n_written, int64_t w_limit,
                     const int64_t *other, int64_t n_other, int64_t o_limit) {
    for (int64_t i = 0; i < n_written; i++)
        if (written[i] < 0 || written[i] >= w_limit) return WRITTEN_RANGE;
    for (int64_t i = 0; i < n_other; i++)
        if (other[i] < 0 || other[i] >= o_limit) return OTHER_RANGE;
    if (n_written < 2) return JOB_OK;
    /* one bit per possible target: a few KiB to a few hundred KiB, zeroed by calloc */
    uint64_t *seen = calloc((size_t)(w_limit / 64 + 1), sizeof(uint64_t));
    if (seen == NULL) return NO_MEMORY;
    int rc = JOB_OK;
    for (int64_t i = 0; i < n_written; i++) {
        uint64_t bit = UINT64_C(1) << (written[i] & 63);
        uint64_t *word = &seen[written[i] >> 6];
        if (*word & bit) {
            rc = WRITTEN_TWICE;
            break;
        }
        *word |= bit;
    }
    free(seen);
    return rc;
}
