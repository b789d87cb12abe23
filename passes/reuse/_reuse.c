/* accelc: fused CPU kernels of adaptive deep reuse (the gather/scatter work around the GEMMs).
 *
 * Conventions (see runtime/reuse_kernels.py): rows are (n, oh, ow), P = Ho*Wo; unfolded columns
 * k = c*kh*kw + i*kw + j, cut into G chunks of L; ids[n][g][p] is the cluster of row (n,p) in
 * chunk g, an index into tables with T rows. Scope "image": clusters never span images, so work
 * is split over images; scope "batch": split over chunks. No two threads write one table row.
 * reuse_hash takes the zero-padded input (geom pads 0); the others the input itself.
 * Built at first use with  cc -O3 -march=native -fopenmp -shared -fPIC.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int N, C, Hin, Win, kh, kw, sh, sw, pt, pl, dh, dw, Ho, Wo, L, G;
} geom_t;

/* Number the buckets of each chunk by first appearance. ids get chunk-local numbers,
 * ncl[g] the number of clusters of chunk g. map: 2^H entries per thread. */
int reuse_compact(const int32_t *bucket, int N, int G, int P, int H, int by_image,
                  int32_t *ids, int64_t *ncl, int nthreads) {
    const int64_t nb = (int64_t)1 << H;
    int failed = 0;
    if (nthreads > G) nthreads = G;  /* one map per thread: no more threads than chunks */
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        int32_t *map = (int32_t *)malloc(sizeof(int32_t) * nb);
        int64_t cap = by_image ? P : ((int64_t)N * P < nb ? (int64_t)N * P : nb);
        int32_t *touched = (int32_t *)malloc(sizeof(int32_t) * cap);
        if (!map || !touched) {
#pragma omp atomic write
            failed = 1;
        } else {
            for (int64_t i = 0; i < nb; i++) map[i] = -1;
#pragma omp for schedule(dynamic, 1)
            for (int g = 0; g < G; g++) {
                int32_t next = 0;
                int64_t nt = 0;
                for (int n = 0; n < N; n++) {
                    const int32_t *bk = bucket + ((int64_t)n * G + g) * P;
                    int32_t *id = ids + ((int64_t)n * G + g) * P;
                    for (int p = 0; p < P; p++) {
                        int32_t b = bk[p];
                        int32_t v = map[b];
                        if (v < 0) {
                            v = next++;
                            map[b] = v;
                            touched[nt++] = b;
                        }
                        id[p] = v;
                    }
                    if (by_image) {
                        for (int64_t t = 0; t < nt; t++) map[touched[t]] = -1;
                        nt = 0;
                    }
                }
                for (int64_t t = 0; t < nt; t++) map[touched[t]] = -1;
                ncl[g] = next;
            }
        }
        free(map);
        free(touched);
    }
    return failed ? -1 : 0;
}

/* The input arrives zero-padded (xp: [N][C][Hp][Wp]); a row's chunk element l is
 * xp[n][base(row) + off[g*L+l]] with base = oh*sh*Wp + ow*sw. No bounds checks in inner loops. */
static int64_t *col_offsets(const geom_t *q) {
    const int khw = q->kh * q->kw, K = q->C * khw;
    int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (K > 0 ? K : 1));
    for (int k = 0; k < K; k++) {
        int c = k / khw, r = k % khw, i = r / q->kw, j = r % q->kw;
        off[k] = (int64_t)c * q->Hin * q->Win + (int64_t)i * q->dh * q->Win + (int64_t)j * q->dw;
    }
    return off;
}

/* Bucket of every row-chunk: sign bits of (x - mu) . planes[g][l][:H] (planes padded to Hs floats
 * per l). q->Hin/Win are the padded sizes here. Parallel over images; vectorised along ow. */
void reuse_hash(const float *xp, const float *planes, const float *mu, const geom_t *q, int H, int Hs,
                int32_t *bucket, int nthreads) {
    const int P = q->Ho * q->Wo, K = q->C * q->kh * q->kw, Wo = q->Wo, sw = q->sw;
    int64_t *off = col_offsets(q);
#pragma omp parallel num_threads(nthreads)
    {
        float *restrict acc = (float *)malloc(sizeof(float) * H * Wo);
        float *restrict v = (float *)malloc(sizeof(float) * Wo);
#pragma omp for schedule(dynamic, 1)
        for (int n = 0; n < q->N; n++) {
            const float *xn = xp + (int64_t)n * q->C * q->Hin * q->Win;
            for (int g = 0; g < q->G; g++) {
                int L0 = g * q->L, Lg = K - L0 < q->L ? K - L0 : q->L;
                const float *pg = planes + (int64_t)g * q->L * Hs;
                int32_t *bk = bucket + ((int64_t)n * q->G + g) * P;
                for (int oh = 0; oh < q->Ho; oh++) {
                    const float *xrow = xn + (int64_t)oh * q->sh * q->Win;
                    memset(acc, 0, sizeof(float) * H * Wo);
                    for (int l = 0; l < Lg; l++) {
                        const float *restrict xs = xrow + off[L0 + l];
                        const float m = mu[L0 + l];
                        if (sw == 1)
                            for (int ow = 0; ow < Wo; ow++) v[ow] = xs[ow] - m;
                        else
                            for (int ow = 0; ow < Wo; ow++) v[ow] = xs[(int64_t)ow * sw] - m;
                        const float *pl = pg + (int64_t)l * Hs;
                        for (int h = 0; h < H; h++) {
                            const float c = pl[h];
                            float *restrict a = acc + (int64_t)h * Wo;
                            for (int ow = 0; ow < Wo; ow++) a[ow] += c * v[ow];
                        }
                    }
                    int32_t *b = bk + oh * Wo;
                    for (int ow = 0; ow < Wo; ow++) b[ow] = 0;
                    for (int h = 0; h < H; h++)
                        for (int ow = 0; ow < Wo; ow++) b[ow] |= (acc[(int64_t)h * Wo + ow] > 0.0f) << h;
                }
            }
        }
        free(acc);
        free(v);
    }
    free(off);
}

/* Per unfolded column k: its offset inside an image (for patches fully inside the input) and its
 * (c, i*dh, j*dw) for border patches, which check bounds element by element. */
typedef struct {
    int64_t *off;
    int *c, *di, *dj;
} cols_t;

static cols_t make_cols(const geom_t *q) {
    const int khw = q->kh * q->kw, K = q->C * khw;
    cols_t t;
    t.off = (int64_t *)malloc(sizeof(int64_t) * (K > 0 ? K : 1));
    t.c = (int *)malloc(sizeof(int) * (K > 0 ? K : 1));
    t.di = (int *)malloc(sizeof(int) * (K > 0 ? K : 1));
    t.dj = (int *)malloc(sizeof(int) * (K > 0 ? K : 1));
    for (int k = 0; k < K; k++) {
        int c = k / khw, r = k % khw, i = r / q->kw, j = r % q->kw;
        t.c[k] = c;
        t.di[k] = i * q->dh;
        t.dj[k] = j * q->dw;
        t.off[k] = (int64_t)c * q->Hin * q->Win + (int64_t)t.di[k] * q->Win + t.dj[k];
    }
    return t;
}

static void free_cols(cols_t t) {
    free(t.off);
    free(t.c);
    free(t.di);
    free(t.dj);
}

/* dir = +1: tab[id][l] += x(row, l) (centroid sums); dir = -1: x(row, l) += tab[id][l] (col2im).
 * x is the unpadded input (q->pt/pl are the real pads); padding positions read as 0 / are skipped. */
static void move_ng(const geom_t *q, const cols_t *cols, float *x, const int32_t *ids, float *tab,
                    int n, int g, int dir) {
    const int P = q->Ho * q->Wo, K = q->C * q->kh * q->kw;
    const int L0 = g * q->L, Lg = K - L0 < q->L ? K - L0 : q->L;
    const int64_t *o = cols->off + L0;
    const int *cc = cols->c + L0, *di = cols->di + L0, *dj = cols->dj + L0;
    const int spanh = (q->kh - 1) * q->dh, spanw = (q->kw - 1) * q->dw;
    const int64_t plane = (int64_t)q->Hin * q->Win;
    const int32_t *id = ids + ((int64_t)n * q->G + g) * P;
    float *xn = x + (int64_t)n * q->C * plane;
    for (int oh = 0; oh < q->Ho; oh++) {
        const int ih0 = oh * q->sh - q->pt;
        const int hin = ih0 >= 0 && ih0 + spanh < q->Hin;
        for (int ow = 0; ow < q->Wo; ow++) {
            const int iw0 = ow * q->sw - q->pl;
            const int32_t cid = id[oh * q->Wo + ow];
            if (cid < 0) continue; /* a row left out (cross-batch reuse: its cluster is kept) */
            float *t = tab + (int64_t)cid * q->L;
            if (hin && iw0 >= 0 && iw0 + spanw < q->Win) {
                float *xb = xn + (int64_t)ih0 * q->Win + iw0;
                if (dir > 0)
                    for (int l = 0; l < Lg; l++) t[l] += xb[o[l]];
                else
                    for (int l = 0; l < Lg; l++) xb[o[l]] += t[l];
            } else {
                for (int l = 0; l < Lg; l++) {
                    int ih = ih0 + di[l], iw = iw0 + dj[l];
                    if (ih < 0 || ih >= q->Hin || iw < 0 || iw >= q->Win) continue;
                    float *v = xn + cc[l] * plane + (int64_t)ih * q->Win + iw;
                    if (dir > 0)
                        t[l] += *v;
                    else
                        *v += t[l];
                }
            }
        }
    }
}

static void sums_ng(const geom_t *q, const cols_t *cols, const float *x, const int32_t *ids, float *sums,
                    float *counts, int n, int g) {
    const int P = q->Ho * q->Wo;
    const int32_t *id = ids + ((int64_t)n * q->G + g) * P;
    for (int p = 0; p < P; p++)
        if (id[p] >= 0) counts[id[p]] += 1.0f;
    move_ng(q, cols, (float *)x, ids, sums, n, g, +1);
}

void reuse_sums(const float *x, const int32_t *ids, const geom_t *q, int by_image,
                float *sums, float *counts, int nthreads) {
    cols_t cols = make_cols(q);
    if (by_image) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
        for (int n = 0; n < q->N; n++)
            for (int g = 0; g < q->G; g++) sums_ng(q, &cols, x, ids, sums, counts, n, g);
    } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
        for (int g = 0; g < q->G; g++)
            for (int n = 0; n < q->N; n++) sums_ng(q, &cols, x, ids, sums, counts, n, g);
    }
    free_cols(cols);
}

/* dx (zeroed by the caller) += fold of d[id][l]; images are disjoint, whatever the scope. */
void reuse_scatter_dx(const float *d, const int32_t *ids, const geom_t *q, float *dx, int nthreads) {
    cols_t cols = make_cols(q);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int n = 0; n < q->N; n++)
        for (int g = 0; g < q->G; g++) move_ng(q, &cols, dx, ids, (float *)d, n, g, -1);
    free_cols(cols);
}

#define PB 16

/* y[n][co][p] = bias[co] + sum_g pm[ids[n][g][p]][co] */
void reuse_gather_out(const float *pm, const int32_t *ids, const float *bias, int N, int G, int P,
                      int Co, float *y, int nthreads) {
    const int nblk = (P + PB - 1) / PB;
#pragma omp parallel num_threads(nthreads)
    {
        float *acc = (float *)malloc(sizeof(float) * PB * Co);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < (int64_t)N * nblk; t++) {
            int n = (int)(t / nblk), p0 = (int)(t % nblk) * PB;
            int np = P - p0 < PB ? P - p0 : PB;
            for (int p = 0; p < np; p++) {
                float *a = acc + p * Co;
                if (bias) memcpy(a, bias, sizeof(float) * Co);
                else memset(a, 0, sizeof(float) * Co);
                for (int g = 0; g < G; g++) {
                    const float *row = pm + (int64_t)ids[((int64_t)n * G + g) * P + p0 + p] * Co;
                    for (int co = 0; co < Co; co++) a[co] += row[co];
                }
            }
            for (int co = 0; co < Co; co++) {
                float *yo = y + ((int64_t)n * Co + co) * P + p0;
                for (int p = 0; p < np; p++) yo[p] = acc[p * Co + co];
            }
        }
        free(acc);
    }
}

/* Rows p0..p0+np of image n, transposed into tile, added to their clusters in chunks g0..g1-1. */
static void grad_rows(const float *dy, const int32_t *ids, int n, int G, int g0, int g1, int P, int Co, int p0,
                      float *tile, float *gs) {
    const int np = P - p0 < PB ? P - p0 : PB;
    for (int co = 0; co < Co; co++) {
        const float *d = dy + ((int64_t)n * Co + co) * P + p0;
        for (int p = 0; p < np; p++) tile[p * Co + co] = d[p];
    }
    for (int g = g0; g < g1; g++)
        for (int p = 0; p < np; p++) {
            float *row = gs + (int64_t)ids[((int64_t)n * G + g) * P + p0 + p] * Co;
            const float *t = tile + p * Co;
            for (int co = 0; co < Co; co++) row[co] += t[co];
        }
}

/* gs[ids[n][g][p]][co] += dy[n][co][p] (per-cluster sums of the output gradient rows) */
void reuse_grad_sums(const float *dy, const int32_t *ids, int N, int G, int P, int Co, int by_image,
                     float *gs, int nthreads) {
    const int nblk = (P + PB - 1) / PB;
#pragma omp parallel num_threads(nthreads)
    {
        float *tile = (float *)malloc(sizeof(float) * PB * Co);
        if (by_image) {
#pragma omp for schedule(dynamic, 1)
            for (int n = 0; n < N; n++)
                for (int b = 0; b < nblk; b++) grad_rows(dy, ids, n, G, 0, G, P, Co, b * PB, tile, gs);
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int g = 0; g < G; g++)
                for (int n = 0; n < N; n++)
                    for (int b = 0; b < nblk; b++) grad_rows(dy, ids, n, G, g, g + 1, P, Co, b * PB, tile, gs);
        }
        free(tile);
    }
}
