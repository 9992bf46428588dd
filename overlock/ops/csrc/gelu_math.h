/* The constants of the GELU and exp kernels, shared by their 8-lane (gelu_avx2.h, exp_neg_avx2.h) and 16-lane
 * (gelu_avx512.c) forms, which must give the same bits. */
#ifndef OVERLOCK_GELU_MATH_H
#define OVERLOCK_GELU_MATH_H

/* Abramowitz & Stegun 7.1.26: erfc(u) = t P(t) e^(-u^2), t = 1 / (1 + p u) */
#define AS_P 0.3275911f
#define AS_A1 0.254829592f
#define AS_A2 -0.284496736f
#define AS_A3 1.421413741f
#define AS_A4 -1.453152027f
#define AS_A5 1.061405429f
#define INV_SQRT_2PI 0.3989422804014327f
#define INV_SQRT_2 0.70710678118654752f

/* e^x = 2^n p(r): n = round(x log2 e), r = x - n ln 2 (ln 2 in two parts), p of degree 6 */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

/* erf(u) = u P(u^2) / Q(u^2) on [-4, 4] (Eigen's and XLA's rational approximation) */
#define ERF_P0 -2.72614225801306e-10f
#define ERF_P1 2.77068142495902e-08f
#define ERF_P2 -2.10102402082508e-06f
#define ERF_P3 -5.69250639462346e-05f
#define ERF_P4 -7.34990630326855e-04f
#define ERF_P5 -2.95459980854025e-03f
#define ERF_P6 -1.60960333262415e-02f
#define ERF_Q0 -1.45660718464996e-05f
#define ERF_Q1 -2.13374055278905e-04f
#define ERF_Q2 -1.68282697438203e-03f
#define ERF_Q3 -7.37332916720468e-03f
#define ERF_Q4 -1.42647390514189e-02f

#endif
