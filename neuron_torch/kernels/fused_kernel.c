/* One pass of a single sigmoid neuron over a batch, reading X once.
 *
 * Per row i:  z_i = x_i·w + b
 *             loss_i = softplus(z_i) − y_i·z_i   with softplus(z) = max(z, 0) + log1p(e^−|z|)  (no overflow)
 *             a_i = σ(z_i),  dz_i = a_i − y_i
 *             dw += dz_i·x_i,  db += dz_i
 * and the sums are divided by m.
 *
 * Rows are taken in blocks of about 16 KiB, half the L1 data cache: the dot products of a block (which give z)
 * bring its rows into L1, and the update of dw reads them again from there, so each row comes from memory once.
 * While a block is worked on, the next one is prefetched, so memory stays busy through the arithmetic rather
 * than only during the dot products.  Each thread walks its own contiguous share of rows with its own partial
 * sums; the partials are added in thread order at the end, so a given thread count always gives the same bits.
 *
 * Precision: the arithmetic of a row is in the input type (float32 rows give float32 z, as a float32 matmul
 * does); every FLUSH_ROWS rows the partial sums are added into double, so rounding does not grow with m.
 *
 * Built by neuron_torch/fused.py:  cc -O3 [-march=native] [-fopenmp] -fno-math-errno -shared -fPIC.
 * The body below is written once for a type REAL and instantiated for float and double by including this
 * file into itself.
 */

#ifndef REAL

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* glibc ≥ 2.35 ships vector versions of exp and log1p (libmvec); declaring them lets GCC evaluate a block's
 * sigmoids and softpluses several at a time.  Elsewhere the scalar functions are called. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GLIBC_PREREQ) && defined(__GNUC__) && \
    !defined(__clang__)
#if __GLIBC_PREREQ(2, 35)
#define VECTOR_MATH __attribute__((simd("notinbranch")))
VECTOR_MATH float expf(float);
VECTOR_MATH float log1pf(float);
VECTOR_MATH double exp(double);
VECTOR_MATH double log1p(double);
#endif
#endif

#if defined(__GNUC__)
#define PREFETCH(address) __builtin_prefetch((address), 0, 3)
#else
#define PREFETCH(address) ((void)0)
#endif

#define BLOCK_BYTES 16384  /* a block of rows: half of a 32 KiB L1, the other half for w, dw and the next block */
#define MAX_BLOCK_ROWS 256
#define FLUSH_ROWS 256     /* rows summed in the input type before the partial sums go into double */
#define CACHE_LINE 64
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

#define REAL float
#define SUFFIX f32
#define EXP expf
#define LOG1P log1pf
#define FABS fabsf
#define EXP_CAP 80.0f  /* e^-80 ≈ 1.8e-35, inside the vector exp's fast range */
#define LOG1P_EXACT 0x1p-24f
#include __FILE__
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG1P
#undef FABS
#undef EXP_CAP
#undef LOG1P_EXACT

#define REAL double
#define SUFFIX f64
#define EXP exp
#define LOG1P log1p
#define FABS fabs
#define EXP_CAP 700.0  /* e^-700 ≈ 9.9e-305, inside the vector exp's fast range */
#define LOG1P_EXACT 0x1p-53
#include __FILE__

#else /* the body, once per REAL */

#define FN(name) CAT(name, SUFFIX)

/* Ask for rows [first, first + count) of X, clipped to this thread's share, ahead of their use. */
static inline void FN(prefetch_rows)(const REAL *X, int64_t ldx, int64_t n, int64_t first, int64_t count,
                                     int64_t end) {
    if (first + count > end) count = end - first;
    for (int64_t q = 0; q < count; q++) {
        const char *row = (const char *)(X + (first + q) * ldx);
        for (int64_t c = 0; c < n * (int64_t)sizeof(REAL); c += CACHE_LINE) PREFETCH(row + c);
    }
}

/* Sums over rows [begin, end): out[0] = Σ loss_i, out[1] = Σ dz_i, out[2 + k] = Σ dz_i·x_ik (double).
 * scratch: n + 2·MAX_BLOCK_ROWS values of REAL. */
static void FN(rows_pass)(const REAL *restrict X, int64_t ldx, const REAL *restrict y, int64_t ys, int64_t n,
                          const REAL *restrict w, REAL b, int64_t begin, int64_t end, int64_t block,
                          REAL *restrict scratch, double *restrict out) {
    REAL *restrict dw = scratch;             /* (n,)  Σ dz_i·x_i since the last flush into out */
    REAL *restrict z = scratch + n;          /* (block,) */
    REAL *restrict dz = z + MAX_BLOCK_ROWS;  /* (block,) */
    for (int64_t k = 0; k < n; k++) dw[k] = 0;
    for (int64_t k = 0; k < n + 2; k++) out[k] = 0.0;
    int64_t since_flush = 0;

    for (int64_t i0 = begin; i0 < end; i0 += block) {
        const int64_t rows = (end - i0 < block) ? end - i0 : block;
        const REAL *x0 = X + i0 * ldx;
        /* the next block is prefetched in two halves: one during the dot products, one during the dw update */
        const int64_t next = i0 + block, half = (block + 1) / 2;

        /* z = x·w + b, four rows at a time: four independent sums hide the latency of each multiply-add */
        int64_t j = 0;
        for (; j + 4 <= rows; j += 4) {
            const REAL *p0 = x0 + j * ldx, *p1 = p0 + ldx, *p2 = p1 + ldx, *p3 = p2 + ldx;
            FN(prefetch_rows)(X, ldx, n, next + j / 2, 2, end);
            REAL s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t k = 0; k < n; k++) {
                s0 += p0[k] * w[k];
                s1 += p1[k] * w[k];
                s2 += p2[k] * w[k];
                s3 += p3[k] * w[k];
            }
            z[j] = s0 + b;
            z[j + 1] = s1 + b;
            z[j + 2] = s2 + b;
            z[j + 3] = s3 + b;
        }
        for (; j < rows; j++) {
            const REAL *p = x0 + j * ldx;
            REAL s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < n; k++) s += p[k] * w[k];
            z[j] = s + b;
        }

        /* loss_i, a_i = σ(z_i) and dz_i = a_i − y_i, from e = exp(−|z|) in (0, 1], which cannot overflow */
        REAL loss_block = 0, db_block = 0;
        const REAL *yb = y + i0 * ys;
#pragma omp simd reduction(+ : loss_block, db_block)
        for (int64_t r = 0; r < rows; r++) {
            const REAL zr = z[r], yr = yb[r * ys];
            /* Near and past the underflow of e^-|z| the vector exp takes a slow path (large weights reach
             * it): exp gets |z| capped at EXP_CAP, and e is then taken as 0 past it.
             * That is exact where e^-|z| rounds to 0 anyway (|z| > 104 in float32, > 745 in float64) and off by
             * less than e^-EXP_CAP in the band between. */
            const int beyond = FABS(zr) >= EXP_CAP;
            const REAL e_capped = EXP(-(beyond ? EXP_CAP : FABS(zr)));
            const REAL e = beyond ? (REAL)0 : e_capped;
            const REAL a = (zr >= 0 ? (REAL)1 : e) / (1 + e);  /* σ(z): 1/(1+e) for z ≥ 0, e/(1+e) below */
            /* log1p(e) = e to the last bit once e < 2^-(mantissa bits); the vector log1p takes a slow path for
             * such tiny arguments (4x slower per call), so they get e itself */
            const int tiny = e < LOG1P_EXACT;
            const REAL l = LOG1P(tiny ? (REAL)0.5 : e);  /* 0.5: any argument on the fast path, result unused */
            loss_block += (zr > 0 ? zr : 0) + (tiny ? e : l) - yr * zr; /* softplus(z) − y·z */
            dz[r] = a - yr;
            db_block += dz[r];
        }
        out[0] += loss_block;
        out[1] += db_block;

        /* dw += Σ dz_i·x_i while the block's rows are still in L1; four rows per pass over dw */
        j = 0;
        for (; j + 4 <= rows; j += 4) {
            const REAL *p0 = x0 + j * ldx, *p1 = p0 + ldx, *p2 = p1 + ldx, *p3 = p2 + ldx;
            const REAL d0 = dz[j], d1 = dz[j + 1], d2 = dz[j + 2], d3 = dz[j + 3];
            FN(prefetch_rows)(X, ldx, n, next + half + j / 2, 2, end);
#pragma omp simd
            for (int64_t k = 0; k < n; k++) dw[k] += d0 * p0[k] + d1 * p1[k] + d2 * p2[k] + d3 * p3[k];
        }
        for (; j < rows; j++) {
            const REAL *p = x0 + j * ldx;
            const REAL d = dz[j];
#pragma omp simd
            for (int64_t k = 0; k < n; k++) dw[k] += d * p[k];
        }

        since_flush += rows;
        if (since_flush >= FLUSH_ROWS || i0 + rows >= end) {
#pragma omp simd
            for (int64_t k = 0; k < n; k++) {
                out[2 + k] += dw[k];
                dw[k] = 0;
            }
            since_flush = 0;
        }
    }
}

/* The whole batch: X (m, n) with row stride ldx, y (m,) with stride ys, w (n,), b (1,).
 * Writes loss = mean(loss_i), dw = Σ dz_i·x_i / m (n,) and db = mean(dz_i), and returns 0; or returns 1 when
 * out of memory, with nothing written (the caller takes another path). */
int FN(neuron_pass)(const REAL *X, int64_t m, int64_t n, int64_t ldx, const REAL *y, int64_t ys,
                    const REAL *w, const REAL *b, int nthreads, REAL *loss_out, REAL *dw_out, REAL *db_out) {
    if (nthreads < 1 || m < 2) nthreads = 1;
    if ((int64_t)nthreads > m) nthreads = (int)m;
    int64_t block = BLOCK_BYTES / (n * (int64_t)sizeof(REAL));
    block = block < 4 ? 4 : block > MAX_BLOCK_ROWS ? MAX_BLOCK_ROWS : block;

    /* per thread: n + 2 partial sums in double, then its scratch, each padded to whole cache lines so that
     * no two threads write to one line */
    const size_t out_size = ((size_t)(n + 2) * sizeof(double) + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE;
    const size_t scratch_size =
        ((size_t)(n + 2 * MAX_BLOCK_ROWS) * sizeof(REAL) + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE;
    const size_t stride = out_size + scratch_size;
    char *memory = malloc(stride * (size_t)nthreads + CACHE_LINE);
    if (!memory) return 1;
    char *base = memory + (CACHE_LINE - (uintptr_t)memory % CACHE_LINE) % CACHE_LINE;
    const REAL bias = *b;

    if (nthreads == 1) {
        FN(rows_pass)(X, ldx, y, ys, n, w, bias, 0, m, block, (REAL *)(base + out_size), (double *)base);
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
        {
            /* contiguous shares of rows, so each thread streams its own part of X */
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            char *mine = base + (size_t)t * stride;
            FN(rows_pass)(X, ldx, y, ys, n, w, bias, m * t / nt, m * (t + 1) / nt, block,
                          (REAL *)(mine + out_size), (double *)mine);
#pragma omp single
            nthreads = nt; /* the runtime may give fewer threads than asked */
        }
#else
        nthreads = 1;
        FN(rows_pass)(X, ldx, y, ys, n, w, bias, 0, m, block, (REAL *)(base + out_size), (double *)base);
#endif
    }

    /* add the threads' partials in thread order, then divide by m */
    double *total = (double *)base;
    for (int t = 1; t < nthreads; t++) {
        const double *part = (const double *)(base + (size_t)t * stride);
#pragma omp simd
        for (int64_t k = 0; k < n + 2; k++) total[k] += part[k];
    }
    const double inv_m = 1.0 / (double)m;
    *loss_out = (REAL)(total[0] * inv_m);
    *db_out = (REAL)(total[1] * inv_m);
#pragma omp simd
    for (int64_t k = 0; k < n; k++) dw_out[k] = (REAL)(total[2 + k] * inv_m);
    free(memory);
    return 0;
}

#undef FN
#endif
