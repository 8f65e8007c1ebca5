/* fracgraph's optimizer step: PyTorch's SGD (momentum, weight decay, no dampening, no Nesterov) over every trainable
 * parameter in one call, on several threads (runtime.SGDMomentum calls it through ctypes; not an onnxruntime op).
 *
 *   d = g + wd * w          (g where wd = 0)
 *   m = d                   on a parameter's first step (PyTorch's momentum buffer starts as a copy of d)
 *   m = m * mu + d          afterwards
 *   w = w - lr * m
 *
 * each step one float32 rounding, in this order, which is what runtime.SGDMomentum's numpy form computes (its Python
 * float lr, mu and wd become float32 scalars under NumPy's promotion rules, as the floats passed here): the results
 * are bitwise numpy's (tests/test_runtime_sgd.py). numpy runs the update as five single-threaded passes over each
 * parameter with two temporaries (48 ms of resnet18's ~300 ms step, 11.2M parameters); here it is one pass reading
 * w, g, m and writing w, m, the parameters' elements split into equal chunks over the threads.
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
  float** w;
  const float* const* g;
  float** m;
  const int64_t* size;
  const int32_t* first;
  int64_t n_params;
  float lr, mu, wd;
  int64_t begin, end;   /* this thread's elements, counted over the parameters in order */
} SgdJob;

static void sgd_range(const SgdJob* j) {
  int64_t off = 0;
  for (int64_t p = 0; p < j->n_params && off < j->end; off += j->size[p], ++p) {
    const int64_t a = j->begin > off ? j->begin - off : 0, b = j->end - off < j->size[p] ? j->end - off : j->size[p];
    if (a >= b) continue;
    float* restrict w = j->w[p];
    const float* restrict g = j->g[p];
    float* restrict m = j->m[p];
    const float lr = j->lr, mu = j->mu, wd = j->wd;
    if (j->first[p]) {
      if (wd != 0.0f)
        for (int64_t i = a; i < b; ++i) {
          const float d = g[i] + wd * w[i];
          m[i] = d;
          w[i] = w[i] - lr * d;
        }
      else
        for (int64_t i = a; i < b; ++i) {
          m[i] = g[i];
          w[i] = w[i] - lr * g[i];
        }
    } else {
      if (wd != 0.0f)
        for (int64_t i = a; i < b; ++i) {
          const float v = m[i] * mu + (g[i] + wd * w[i]);
          m[i] = v;
          w[i] = w[i] - lr * v;
        }
      else
        for (int64_t i = a; i < b; ++i) {
          const float v = m[i] * mu + g[i];
          m[i] = v;
          w[i] = w[i] - lr * v;
        }
    }
  }
}

static void* sgd_thread(void* p) {
  sgd_range((const SgdJob*)p);
  return NULL;
}

/* One step over n_params parameters (w[p], g[p], m[p]: size[p] floats each; first[p] = 1: m is written, not read).
 * Returns 0, or 1 where a thread could not be started (the step is then completed on the calling thread). */
int fg_sgd_step(int64_t n_params, float** w, const float* const* g, float** m, const int64_t* size,
                const int32_t* first, float lr, float mu, float wd, int threads) {
  int64_t total = 0;
  for (int64_t p = 0; p < n_params; ++p) total += size[p];
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  if (total < 65536) threads = 1;   /* a thread's start costs more than a small model's update */
  SgdJob jobs[64];
  pthread_t tid[64];
  int started[64] = {0}, failed = 0;
  for (int t = 0; t < threads; ++t) {
    jobs[t] = (SgdJob){w, g, m, size, first, n_params, lr, mu, wd, total * t / threads, total * (t + 1) / threads};
    if (t > 0) {
      started[t] = pthread_create(&tid[t], NULL, sgd_thread, &jobs[t]) == 0;
      if (!started[t]) failed = 1, sgd_range(&jobs[t]);
    }
  }
  sgd_range(&jobs[0]);
  for (int t = 1; t < threads; ++t)
    if (started[t]) pthread_join(tid[t], NULL);
  return failed;
}
