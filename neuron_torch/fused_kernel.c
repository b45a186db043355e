/* One pass of a single sigmoid neuron over a batch, reading X once.
 *
 * Per row i:  z_i = x_i·w + b
 *             loss_i = softplus(z_i) − y_i·z_i   with softplus(z) = max(z, 0) + log1p(e^−|z|)  (no overflow)
 *             a_i = σ(z_i),  dz_i = a_i − y_i
 *             dw += dz_i·x_i,  db += dz_i
 * and the results are divided by m.  Rows are taken in blocks small enough to stay in L1 between the dot
 * products (which give z) and the update of dw, so each row comes from memory once.  Each thread walks its
 * own contiguous share of rows and keeps its own partial sums; the partials are added in thread order at the
 * end, so a given thread count always gives the same bits.
 *
 * Precision: inside a block the arithmetic is in the input type (float32 rows give float32 z, as a float32
 * matmul does); each block's partial sums are added into double, so rounding does not grow with m.
 *
 * Built by neuron_torch/fused.py as:  cc -O3 [-march=native] [-fopenmp] -fno-math-errno -shared -fPIC.
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

/* glibc ≥ 2.35 ships vector versions of exp and log1p (libmvec); declaring them lets the compiler evaluate
 * the block's sigmoids and softpluses several at a time.  Elsewhere the scalar functions are called. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GLIBC_PREREQ)
#if __GLIBC_PREREQ(2, 35)
#define VECTOR_MATH __attribute__((simd("notinbranch")))
VECTOR_MATH float expf(float);
VECTOR_MATH float log1pf(float);
VECTOR_MATH double exp(double);
VECTOR_MATH double log1p(double);
#endif
#endif

#define L1_BLOCK_BYTES 16384 /* rows of a block fit in half of a 32 KiB L1 data cache */
#define MAX_BLOCK_ROWS 256
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

#define REAL float
#define SUFFIX f32
#define EXP expf
#define LOG1P log1pf
#define FABS fabsf
#include __FILE__
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG1P
#undef FABS

#define REAL double
#define SUFFIX f64
#define EXP exp
#define LOG1P log1p
#define FABS fabs
#include __FILE__

#else /* the body, once per REAL */

#define FN(name) CAT(name, SUFFIX)

/* Sums over rows [begin, end): out[0] = Σ loss_i, out[1] = Σ dz_i, out[2 + k] = Σ dz_i·x_ik.
 * scratch holds n + 2·MAX_BLOCK_ROWS values of REAL. */
static void FN(rows_pass)(const REAL *restrict X, int64_t ldx, const REAL *restrict y, int64_t ys,
                          int64_t n, const REAL *restrict w, REAL b, int64_t begin, int64_t end,
                          int64_t block, REAL *restrict scratch, double *restrict out) {
    REAL *restrict dw = scratch;               /* (n,)  this block's Σ dz_i·x_i */
    REAL *restrict z = scratch + n;            /* (block,) */
    REAL *restrict dz = z + MAX_BLOCK_ROWS;    /* (block,) */
    for (int64_t k = 0; k < n; k++) out[2 + k] = 0.0;
    double loss = 0.0, db = 0.0;

    for (int64_t i0 = begin; i0 < end; i0 += block) {
        const int64_t rows = (end - i0 < block) ? end - i0 : block;
        const REAL *x0 = X + i0 * ldx;

        /* z = x·w + b, four rows at a time: four independent accumulators hide the FMA latency */
        int64_t j = 0;
        for (; j + 4 <= rows; j += 4) {
            const REAL *p0 = x0 + j * ldx, *p1 = p0 + ldx, *p2 = p1 + ldx, *p3 = p2 + ldx;
            REAL s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t k = 0; k < n; k++) {
                s0 += p0[k] * w[k];
                s1 += p1[k] * w[k];
                s2 += p2[k] * w[k];
                s3 += p3[k] * w[k];
            }
            z[j] = s0 + b; z[j + 1] = s1 + b; z[j + 2] = s2 + b; z[j + 3] = s3 + b;
        }
        for (; j < rows; j++) {
            const REAL *p = x0 + j * ldx;
            REAL s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < n; k++) s += p[k] * w[k];
            z[j] = s + b;
        }

        /* loss_i, a_i = σ(z_i) and dz_i = a_i − y_i, from one e = exp(−|z|) in (0, 1] that cannot overflow */
        REAL loss_blk = 0, db_blk = 0;
        const REAL *yb = y + i0 * ys;
#pragma omp simd reduction(+ : loss_blk, db_blk)
        for (int64_t r = 0; r < rows; r++) {
            const REAL zr = z[r], yr = yb[r * ys];
            const REAL e = EXP(-FABS(zr));
            const REAL a = (zr >= 0 ? (REAL)1 : e) / (1 + e);  /* σ(z) = 1/(1+e) for z ≥ 0, e/(1+e) below */
            loss_blk += (zr > 0 ? zr : 0) + LOG1P(e) - yr * zr; /* softplus(z) − y·z */
            dz[r] = a - yr;
            db_blk += dz[r];
        }
        loss += loss_blk;
        db += db_blk;

        /* dw += Σ dz_i·x_i while the block's rows are still in L1; four rows per pass over dw */
        j = 0;
        for (; j + 4 <= rows; j += 4) {
            const REAL *p0 = x0 + j * ldx, *p1 = p0 + ldx, *p2 = p1 + ldx, *p3 = p2 + ldx;
            const REAL d0 = dz[j], d1 = dz[j + 1], d2 = dz[j + 2], d3 = dz[j + 3];
#pragma omp simd
            for (int64_t k = 0; k < n; k++) dw[k] += d0 * p0[k] + d1 * p1[k] + d2 * p2[k] + d3 * p3[k];
        }
        for (; j < rows; j++) {
            const REAL *p = x0 + j * ldx;
            const REAL d = dz[j];
#pragma omp simd
            for (int64_t k = 0; k < n; k++) dw[k] += d * p[k];
        }
        /* the block's partial goes into double, so float32 rounding stays that of one block */
        for (int64_t k = 0; k < n; k++) {
            out[2 + k] += dw[k];
            dw[k] = 0;
        }
    }
    out[0] = loss;
    out[1] = db;
}

/* The whole batch: X (m, n) with row stride ldx, y (m,) with stride ys, w (n,), b (1,).
 * Writes loss = mean(loss_i), dw = Σ dz_i·x_i / m (n,), db = mean(dz_i).  Returns 0, or 1 when out of memory
 * (nothing written; the caller takes another path). */
int FN(neuron_pass)(const REAL *X, int64_t m, int64_t n, int64_t ldx, const REAL *y, int64_t ys,
                    const REAL *w, const REAL *b, int nthreads, REAL *loss_out, REAL *dw_out, REAL *db_out) {
    if (nthreads < 1) nthreads = 1;
    if ((int64_t)nthreads > m) nthreads = (int)m;
    int64_t block = L1_BLOCK_BYTES / ((n > 0 ? n : 1) * (int64_t)sizeof(REAL));
    block = block < 4 ? 4 : block > MAX_BLOCK_ROWS ? MAX_BLOCK_ROWS : block;

    /* one row of n + 2 partial sums per thread */
    double *partial = malloc(sizeof(double) * (size_t)nthreads * (size_t)(n + 2));
    if (!partial) return 1;
    int failed = 0;

#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int t = 0, nt = 1;
#endif
        /* contiguous shares of rows, so each thread streams its own part of X */
        const int64_t begin = m * t / nt, end = m * (t + 1) / nt;
        REAL *scratch = malloc(sizeof(REAL) * (size_t)(n + 2 * MAX_BLOCK_ROWS));
        double *out = partial + (size_t)t * (size_t)(n + 2);
        if (scratch) {
            for (int64_t k = 0; k < n; k++) scratch[k] = 0;
            FN(rows_pass)(X, ldx, y, ys, n, w, *b, begin, end, block, scratch, out);
            free(scratch);
        } else {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
        if (t == 0) nthreads = nt; /* the runtime may give fewer threads than asked */
    }

    if (!failed) {
        double loss = 0.0, db = 0.0;
        for (int t = 0; t < nthreads; t++) {
            loss += partial[(size_t)t * (size_t)(n + 2)];
            db += partial[(size_t)t * (size_t)(n + 2) + 1];
        }
        for (int64_t k = 0; k < n; k++) {
            double s = 0.0;
            for (int t = 0; t < nthreads; t++) s += partial[(size_t)t * (size_t)(n + 2) + 2 + (size_t)k];
            dw_out[k] = (REAL)(s / (double)m);
        }
        *loss_out = (REAL)(loss / (double)m);
        *db_out = (REAL)(db / (double)m);
    }
    free(partial);
    return failed;
}

#undef FN
#endif
