/* The stress harness's per-batch accounting, compiled (stress/fast.py builds it with the C
 * compiler at the start of a run and loads it with ctypes; it is not part of evtchn's wheel).
 *
 * It does exactly what the numpy code of stress/workers.py does (that code stays, and runs when
 * no compiler is there), in one call per batch instead of a dozen numpy calls:
 *
 *   vcpu_account   after a consume: per-port delivery tally, the on-the-spot checks (a port
 *                  masked since the setup, a closed port, a port bound to another vCPU), the
 *                  "same moved port in two handlers at once" marks, and the latency of sampled
 *                  ports (send stamp read and cleared, folded at once into the per-port sum and
 *                  count, the histogram and the maximum; stress/workers.py hist_index's buckets)
 *   sender_pick    before a send_many: gather the picked channels' local and dom0 ports and
 *                  stamp the sampled dom0 ports that carry no stamp yet
 *   sender_tally   after it: per-port tally of the new edges
 *
 * Every array is the caller's (the stats segment of stress/shm.py, one writer per row); this
 * file only reads and writes them as the numpy code does (plain loads and stores: the parent
 * reads the tallies at quiescent points, after the writers acknowledged).
 */
#include <math.h>
#include <stdint.h>
#include <time.h>

typedef struct {
    const uint32_t *buf;        /* the consume buffer */
    uint32_t *delivered;        /* this vCPU's per-port delivery row */
    const uint16_t *port_tag;   /* the vCPU a port may be delivered on, or a TAG_* */
    const uint8_t *sampled;     /* latency-sampled ports; NULL: every port */
    uint64_t *stamp;            /* first send since the port's last handling, ns; 0: none */
    uint64_t *lat_sum;          /* this vCPU's per-port latency sum */
    uint32_t *lat_cnt;          /* and count */
    uint64_t *hist;             /* this vCPU's latency histogram */
    uint16_t *active;           /* vCPU + 1 whose handler holds the (moved) port now */
    uint64_t *hdr;              /* this worker's header row */
    uint32_t *moved;            /* scratch, as long as buf */
    uint32_t *bad;              /* out: (port, tag) of the first MAX_BAD violations */
    int64_t nports;
    int32_t v, tag;             /* the vCPU and its active mark (v + 1) */
    int32_t tag_any, tag_dead, hist_sub, hist_buckets;
    int32_t h_delivered, h_overlaps, h_lat_max, h_lat_max_port;
} vcpu_ctx;

#define MAX_BAD 8

static inline int64_t now_ns(void) {        /* time.monotonic_ns's clock */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* stress/workers.py hist_index: log2 buckets with hist_sub linear sub-buckets. */
static inline int64_t hist_index(int64_t lat, int32_t sub_n, int32_t buckets) {
    int e;
    double m = frexp((double)(lat < 1 ? 1 : lat), &e);
    int64_t idx = (int64_t)(e - 1) * sub_n + (int64_t)((m * 2 - 1) * sub_n);
    return idx < 0 ? 0 : idx >= buckets ? buckets - 1 : idx;
}

/* The accounting of buf[0..n); returns how many delivered ports were violations (the first
 * MAX_BAD are in c->bad as port, tag pairs). */
int64_t vcpu_account(vcpu_ctx *c, int64_t n) {
    int64_t now = now_ns(), nbad = 0, nmoved = 0, clashes = 0;
    const uint32_t *buf = c->buf;
    uint16_t mine = (uint16_t)c->v, any = (uint16_t)c->tag_any, tag = (uint16_t)c->tag;
    for (int64_t i = 0; i < n; i++) {           /* the checks, and the moved ports' marks */
        uint32_t p = buf[i];
        /* a port beyond dom0's port space: an engine fault, reported as a dead port (the
         * numpy code would fail on it; here it must not index the tallies) */
        uint16_t t = p < c->nports ? c->port_tag[p] : (uint16_t)c->tag_dead;
        if (t == mine) continue;
        if (t != any) {
            if (nbad < MAX_BAD) {
                c->bad[2 * nbad] = p;
                c->bad[2 * nbad + 1] = t;
            }
            nbad++;
            continue;
        }
        uint16_t before = c->active[p];
        if (before == tag) continue;            /* twice in this batch: marked already */
        if (before != 0) clashes++;             /* in another vCPU's handler right now */
        c->active[p] = tag;
        c->moved[nmoved++] = p;
    }
    uint64_t lat_max = c->hdr[c->h_lat_max];
    for (int64_t i = 0; i < n; i++) {           /* tallies and latency */
        uint32_t p = buf[i];
        if (p >= c->nports) continue;
        c->delivered[p]++;
        if (c->sampled && !c->sampled[p]) continue;
        uint64_t s = c->stamp[p];
        if (!s) continue;
        c->stamp[p] = 0;
        int64_t lat = now - (int64_t)s;
        if (lat < 0) continue;                  /* stamped after `now`: not this event */
        c->lat_sum[p] += (uint64_t)lat;
        c->lat_cnt[p]++;
        c->hist[hist_index(lat, c->hist_sub, c->hist_buckets)]++;
        if ((uint64_t)lat > lat_max) {
            lat_max = (uint64_t)lat;
            c->hdr[c->h_lat_max] = lat_max;
            c->hdr[c->h_lat_max_port] = p;
        }
    }
    for (int64_t i = 0; i < nmoved; i++) {      /* leave the handler: clear our marks */
        uint32_t p = c->moved[i];
        if (c->active[p] == tag)
            c->active[p] = 0;
        else
            clashes++;                          /* another vCPU marked it meanwhile */
    }
    c->hdr[c->h_delivered] += (uint64_t)n;
    c->hdr[c->h_overlaps] += (uint64_t)clashes;
    return nbad;
}

typedef struct {
    uint32_t *lp, *dp;          /* out: the picked channels' local and dom0 ports */
    const uint8_t *sampled;     /* latency-sampled dom0 ports; NULL: every port */
    uint64_t *stamp;
    uint32_t *edges_row;        /* this sender's per-port edge tally */
    const uint8_t *edges;       /* send_many's edge flags */
} sender_ctx;

/* Gather the k picked channels' ports (pos indexes lport/dport) and stamp the sampled dom0
 * ports that carry no stamp yet with `t0` (the send that follows is their first since their
 * last handling). */
void sender_pick(sender_ctx *c, const int64_t *pos, int64_t k, const uint32_t *lport,
                 const uint32_t *dport, int64_t t0) {
    for (int64_t i = 0; i < k; i++) {
        uint32_t d = dport[pos[i]];
        c->lp[i] = lport[pos[i]];
        c->dp[i] = d;
        if ((!c->sampled || c->sampled[d]) && !c->stamp[d]) c->stamp[d] = (uint64_t)t0;
    }
}

/* After send_many: tally the new edges per dom0 port; returns how many there were. */
int64_t sender_tally(sender_ctx *c, int64_t k) {
    int64_t ne = 0;
    for (int64_t i = 0; i < k; i++) {
        if (c->edges[i]) {
            c->edges_row[c->dp[i]]++;
            ne++;
        }
    }
    return ne;
}

/* hist_index alone (tests compare it with stress/workers.py hist_index). */
int64_t hist_bucket(int64_t lat, int32_t sub_n, int32_t buckets) {
    return hist_index(lat, sub_n, buckets);
}
