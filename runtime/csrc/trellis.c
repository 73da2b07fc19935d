/* The trellis search of the `ecq` codec's trellis mode (runtime/codec_trellis.py says what it is
 * and holds the same search in numpy, which the tests hold this one to). Not an onnxruntime
 * operator: Python calls it through ctypes; it lives in the operators' library so that one build
 * serves both.
 *
 * edgesplit_trellis_search(z, rows, d, range, k):
 *   z      f64 (rows, d)  values in units of the union step (escapes already set to 0)
 *   range  the symbol support [-range, range] (even)
 *   k      i32 (rows, d)  out: the symbols; point = k + 0.5 * (union of the state at that channel)
 *   returns 0, or -1 when the scratch cannot be allocated.
 *
 * 4 states, s = 2a + b; a state with a = 1 uses the odd union (points k + 0.5). Branch parity
 * p = k & 1; the next state is (b ^ p, a). Minimum squared error, ties to the first candidate in
 * the order below (the numpy search breaks them the same way).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* predecessors (state, parity) of each next state, in tie-breaking order */
static const int PRED_S[4][2] = {{0, 1}, {2, 3}, {0, 1}, {2, 3}};
static const int PRED_P[4][2] = {{0, 1}, {0, 1}, {1, 0}, {1, 0}};

static int32_t nearest(double z, int s, int p, int32_t range, double *err) {
    double off = 0.5 * (s >> 1);
    double k = p + 2.0 * nearbyint((z - off - p) * 0.5);
    if (k > range) k -= 2.0;
    if (k < -range) k += 2.0;
    *err = z - off - k;
    return (int32_t)k;
}

static void search_row(const double *z, int64_t d, int32_t range, int32_t *sym, uint8_t *from, int32_t *k) {
    double cost[4] = {0.0, INFINITY, INFINITY, INFINITY};
    for (int64_t j = 0; j < d; j++) {
        double next[4];
        for (int ns = 0; ns < 4; ns++) {
            next[ns] = INFINITY;
            for (int i = 0; i < 2; i++) {
                int s = PRED_S[ns][i];
                double err;
                int32_t kk = nearest(z[j], s, PRED_P[ns][i], range, &err);
                double c = cost[s] + err * err;
                if (c < next[ns]) {
                    next[ns] = c;
                    sym[4 * j + ns] = kk;
                    from[4 * j + ns] = (uint8_t)s;
                }
            }
        }
        for (int s = 0; s < 4; s++) cost[s] = next[s];
    }
    int best = 0;
    for (int s = 1; s < 4; s++)
        if (cost[s] < cost[best]) best = s;
    for (int64_t j = d - 1; j >= 0; j--) {
        k[j] = sym[4 * j + best];
        best = from[4 * j + best];
    }
}

int edgesplit_trellis_search(const double *z, int64_t rows, int64_t d, int32_t range, int32_t *k) {
    int32_t *sym = malloc(sizeof(int32_t) * 4 * (size_t)d);
    uint8_t *from = malloc(4 * (size_t)d);
    if (!sym || !from) {
        free(sym);
        free(from);
        return -1;
    }
    for (int64_t r = 0; r < rows; r++) search_row(z + r * d, d, range, sym, from, k + r * d);
    free(sym);
    free(from);
    return 0;
}
