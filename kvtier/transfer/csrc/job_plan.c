/* kvtier staged-path copy plan for one-run layouts (every plane of a page in one piece): the
 * host <-> staging copies of a whole job, merged where consecutive pages of a chunk sit in
 * slots `step` apart (step = layout stride / slot bytes; 0: never merge). The same plan as
 * kvtier.transfer.staged_plan._one_run_copies, which is the fallback and the tests' reference.
 *
 * Page i of the job is in chunk i / ppc at staging offset (i % ppc) * stride + shift of that
 * chunk's buffer (buffers[chunk], or 0 when buffers is NULL); its host bytes start at
 * slots[i] * slot_bytes + host_off. Outputs hold up to n copies; bounds holds chunks + 1
 * entries (copy range of each chunk). Returns the number of copies.
 */
#include <stdint.h>
#include <stddef.h>

int64_t kvtier_plan_copies(const int64_t *slots, int64_t n, int64_t slot_bytes,
                           int64_t host_off, int64_t stride, int64_t shift, int64_t size0,
                           int64_t ppc, int64_t step, const int64_t *buffers, int64_t *host,
                           int64_t *stage, int64_t *size, int64_t *bounds) {
    int64_t m = 0, chunk = -1;
    for (int64_t i = 0; i < n; i++) {
        int64_t c = i / ppc;
        if (c != chunk) { /* a chunk starts: its staging offsets restart, nothing merges */
            chunk = c;
            bounds[c] = m;
        } else if (step > 0 && slots[i] - slots[i - 1] == step) {
            size[m - 1] += step * slot_bytes;
            continue;
        }
        host[m] = slots[i] * slot_bytes + host_off;
        stage[m] = (i % ppc) * stride + shift + (buffers != NULL ? buffers[c] : 0);
        size[m] = size0;
        m++;
    }
    bounds[chunk + 1] = m; /* no pages: chunk is -1, bounds = {0} */
    return m;
}
