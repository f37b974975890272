// The facts the per-step proof compares, read in one pass over a group's tensors
// (fusedopt/host.py builds this at first use and explains why it exists).
//
// read(params, watched, P, G, W[, written]): for params[i] its own facts into row i of P
// and its grad's into row i of G; for watched[j] (state tensors) into row j of W. A row is
// (data address, size in bytes, dtype, device, flags); -1 throughout where there is no
// strided tensor with storage to describe (no grad, a sparse grad, a wrapper subclass).
// written: sorted, disjoint [start, end) address pairs (int64); a grad whose memory meets
// one of them gets kMeets in its flags.
// bump(params, times): autograd's version counter of each param, moved `times` times.
//
// Nothing here decides anything: Python compares the rows with those recorded when the
// plan was built. Only reads, plus the version counter that torch's in-place ops move.
#include <Python.h>

#include <algorithm>
#include <cstring>

#include <c10/core/CPUAllocator.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

constexpr Py_ssize_t kCols = 5;
constexpr int64_t kContiguous = 1;
constexpr int64_t kMeets = int64_t(1) << 62;  // above the digest (host.py's MEETS)

// the flags: bit 0 contiguous, the bits above a digest of the sizes (host.py's _digest
// computes the same), so that a param reshaped in place (p.data = p.data.view(...): same
// address and bytes) no longer matches the plan built for its old shape
int64_t flags(const at::Tensor& t) {
  uint64_t h = 0;
  for (int64_t s : t.sizes()) h = h * 1000003u + static_cast<uint64_t>(s) + 1;
  return (t.is_contiguous() ? kContiguous : 0) |
         static_cast<int64_t>((h & ((uint64_t(1) << 61) - 1)) << 1);
}

void describe(const at::Tensor* tp, int64_t* row) {
  if (!tp || !tp->defined() || tp->layout() != at::kStrided || !tp->has_storage()) {
    for (Py_ssize_t k = 0; k < kCols; ++k) row[k] = -1;
    return;
  }
  const at::Tensor& t = *tp;
  // mutable: the kernels write params and state (a copy-on-write storage is materialised
  // here, as Tensor.data_ptr() does, so the address recorded is the one written)
  row[0] = reinterpret_cast<int64_t>(t.mutable_data_ptr());
  row[1] = static_cast<int64_t>(t.nbytes());
  row[2] = static_cast<int64_t>(t.scalar_type());
  row[3] = static_cast<int64_t>(t.device().type()) * 65536 + t.device().index() + 1;
  row[4] = flags(t);
}

// a writable int64 buffer of exactly rows x kCols, or a Python error
bool table(PyObject* obj, Py_ssize_t rows, Py_buffer* view) {
  if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) return false;
  if (view->itemsize != 8 || view->len != rows * kCols * 8) {
    PyBuffer_Release(view);
    PyErr_SetString(PyExc_ValueError, "fusedopt host: a facts table of the wrong size");
    return false;
  }
  return true;
}

template <class T>
inline void prefetch(const T* p, size_t bytes = sizeof(T)) {
  const char* c = reinterpret_cast<const char*>(p);
  for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

inline void prefetch_storage(const at::Tensor* t) {
  if (t && t->defined() && t->has_storage())
    prefetch(t->unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
}

// The memory the step writes, as sorted, disjoint [start, end) pairs (host.py's ranges()).
// A query [s, e) meets it where the last range that starts before e ends after s.
struct Ranges {
  const int64_t* v = nullptr;
  Py_ssize_t n = 0;

  // k queries at once, by branchless binary searches that go down level by level
  // together: after backward the pairs are cold (16 bytes per tensor written, ~1 MB for
  // 20,000 params with two moments), and k independent loads per level wait for memory
  // once, not k times (one query at a time: +0.8 ms per step on 20,000 params)
  template <size_t K>
  void meets(const int64_t (&s)[K], const int64_t (&e)[K], bool (&out)[K], size_t k) const {
    Py_ssize_t at[K] = {};
    for (Py_ssize_t len = n; len > 1;) {
      const Py_ssize_t half = len / 2;
      for (size_t j = 0; j < k; ++j) at[j] = v[2 * (at[j] + half)] < e[j] ? at[j] + half : at[j];
      len -= half;
    }
    for (size_t j = 0; j < k; ++j)
      out[j] = n > 0 && s[j] < e[j] && v[2 * at[j]] < e[j] && v[2 * at[j] + 1] > s[j];
  }
};

// Whether a storage's memory is an allocation of its own: made by the CPU allocator (its
// raw deleter frees it), not memory of another object (from_blob, numpy, DLPack, mmap).
// Two such live allocations never overlap.
bool own_allocation(const c10::StorageImpl* s,
                    c10::DeleterFnPtr cpu = c10::GetCPUAllocator()->raw_deleter()) {
  return s->device_type() == c10::kCPU && cpu != nullptr && s->data_ptr().get_deleter() == cpu;
}

// A grad's memory (host.py's span()): its own bytes when contiguous, else its storage's.
// Where every written tensor is an allocation of its own (`owned`), a grad whose storage
// is one too and held by that grad alone (a fresh grad from backward) meets none of them:
// no search. Grads that share one storage (flat buffers: thousands of views of one) are
// checked against it once; where it meets the ranges, each grad alone.
template <size_t K>
struct GradCheck {
  const Ranges& written;
  bool owned;
  c10::DeleterFnPtr cpu = c10::GetCPUAllocator()->raw_deleter();
  const c10::StorageImpl* last = nullptr;
  bool last_meets = false;

  void operator()(const at::Tensor* const (&gs)[K], int64_t* rows, size_t k, Py_ssize_t cols) {
    int64_t s[K], e[K];
    bool meets[K];
    size_t ask[K], asked = 0;
    const c10::StorageImpl* impl[K];
    for (size_t j = 0; j < k; ++j) {  // one query per storage not seen just before
      const c10::Storage* st = rows[j * cols] == -1 ? nullptr
          : &gs[j]->unsafeGetTensorImpl()->unsafe_storage();
      impl[j] = st ? st->unsafeGetStorageImpl() : nullptr;
      if (impl[j] && owned && st->use_count() == 1 && own_allocation(impl[j], cpu)) {
        impl[j] = nullptr;  // fresh: meets nothing
      } else if (impl[j] && impl[j] != (asked ? impl[ask[asked - 1]] : last)) {
        s[asked] = reinterpret_cast<int64_t>(impl[j]->data());
        e[asked] = s[asked] + static_cast<int64_t>(impl[j]->nbytes());
        ask[asked++] = j;
      }
    }
    if (asked) written.meets(s, e, meets, asked);
    for (size_t j = 0, q = 0; j < k; ++j) {
      if (q < asked && ask[q] == j) last = impl[j], last_meets = meets[q++];
      int64_t* row = rows + j * cols;
      if (!impl[j] || !last_meets) continue;
      if (!(row[4] & kContiguous)) {
        row[4] |= kMeets;
        continue;
      }
      int64_t s1[1] = {row[0]}, e1[1] = {row[0] + row[1]};  // (rare: a storage that meets)
      bool m1[1];
      written.meets(s1, e1, m1, 1);
      if (m1[0]) row[4] |= kMeets;
    }
  }
};

// Each tensor is reached through a chain of heap objects (list item, Python object,
// TensorImpl, its StorageImpl; for a grad also the AutogradMeta and the grad's own two),
// all cold after backward: read one at a time that is ~6 cache misses in a row per
// tensor, ~0.5 us. So a batch of tensors advances one link at a time, the next link of
// every tensor of the batch prefetched together: one miss latency per link per batch.
constexpr Py_ssize_t kBatch = 16;

void facts(PyObject* list, int64_t* rows, int64_t* grad_rows, const Ranges* written,
           bool owned) {
  const Py_ssize_t n = PyList_GET_SIZE(list);
  const at::Tensor* ts[kBatch];
  const at::Tensor* gs[kBatch];
  const Ranges none;
  GradCheck<kBatch> check{written ? *written : none, owned};
  for (Py_ssize_t base = 0; base < n; base += kBatch) {
    const Py_ssize_t k = std::min(kBatch, n - base);
    for (Py_ssize_t j = 0; j < k; ++j) prefetch(PyList_GET_ITEM(list, base + j), 64);
    for (Py_ssize_t j = 0; j < k; ++j) {
      PyObject* obj = PyList_GET_ITEM(list, base + j);
      ts[j] = THPVariable_Check(obj) ? &THPVariable_Unpack(obj) : nullptr;
      if (ts[j] && ts[j]->defined()) prefetch(ts[j]->unsafeGetTensorImpl());
    }
    for (Py_ssize_t j = 0; j < k; ++j) {
      prefetch_storage(ts[j]);
      if (grad_rows && ts[j] && ts[j]->defined() && ts[j]->unsafeGetTensorImpl()->autograd_meta())
        prefetch(ts[j]->unsafeGetTensorImpl()->autograd_meta(), 128);
    }
    if (grad_rows) {
      for (Py_ssize_t j = 0; j < k; ++j) {
        gs[j] = ts[j] && ts[j]->defined() ? &ts[j]->grad() : nullptr;
        if (gs[j] && gs[j]->defined()) prefetch(gs[j]->unsafeGetTensorImpl());
      }
      for (Py_ssize_t j = 0; j < k; ++j) prefetch_storage(gs[j]);
    }
    for (Py_ssize_t j = 0; j < k; ++j) {
      const Py_ssize_t i = base + j;
      describe(ts[j], rows + i * kCols);
      if (grad_rows) describe(gs[j], grad_rows + i * kCols);
    }
    if (grad_rows && written) check(gs, grad_rows + base * kCols, k, kCols);
  }
}

PyObject* read(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params, *watched, *P, *G, *W, *R = Py_None;
  int owned = 0;
  if (!PyArg_ParseTuple(args, "O!O!OOO|Op", &PyList_Type, &params, &PyList_Type, &watched,
                        &P, &G, &W, &R, &owned))
    return nullptr;
  Py_buffer p, g, w, r;
  if (!table(P, PyList_GET_SIZE(params), &p)) return nullptr;
  if (!table(G, PyList_GET_SIZE(params), &g)) { PyBuffer_Release(&p); return nullptr; }
  if (!table(W, PyList_GET_SIZE(watched), &w)) {
    PyBuffer_Release(&p); PyBuffer_Release(&g); return nullptr;
  }
  Ranges written;
  if (R != Py_None) {
    const bool got = PyObject_GetBuffer(R, &r, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0;
    if (!got || r.itemsize != 8 || r.len % 16 != 0 || !r.format ||
        (std::strcmp(r.format, "l") != 0 && std::strcmp(r.format, "q") != 0)) {
      if (got) {
        PyBuffer_Release(&r);
        PyErr_SetString(PyExc_ValueError, "fusedopt host: written ranges must be int64 pairs");
      }
      PyBuffer_Release(&p); PyBuffer_Release(&g); PyBuffer_Release(&w);
      return nullptr;
    }
    written.v = static_cast<const int64_t*>(r.buf);
    written.n = r.len / 16;
  }
  facts(params, static_cast<int64_t*>(p.buf), static_cast<int64_t*>(g.buf),
        R != Py_None ? &written : nullptr, owned != 0);
  facts(watched, static_cast<int64_t*>(w.buf), nullptr, nullptr, false);
  PyBuffer_Release(&p); PyBuffer_Release(&g); PyBuffer_Release(&w);
  if (R != Py_None) PyBuffer_Release(&r);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* owned(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* tensors;
  if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &tensors)) return nullptr;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tensors); ++i) {
    PyObject* obj = PyList_GET_ITEM(tensors, i);
    if (!THPVariable_Check(obj) || !THPVariable_Unpack(obj).has_storage() ||
        !own_allocation(THPVariable_Unpack(obj).storage().unsafeGetStorageImpl()))
      Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyObject* bump(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* params;
  int times;
  if (!PyArg_ParseTuple(args, "O!i", &PyList_Type, &params, &times)) return nullptr;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
    PyObject* obj = PyList_GET_ITEM(params, i);
    if (!THPVariable_Check(obj)) {
      PyErr_SetString(PyExc_TypeError, "fusedopt host: bump() takes a list of tensors");
      return nullptr;
    }
    // raises torch's own error for an inference tensor, as an in-place update would
    for (int k = 0; k < times; ++k) THPVariable_Unpack(obj).unsafeGetTensorImpl()->bump_version();
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"read", read, METH_VARARGS, "facts of params, their grads and watched tensors"},
    {"bump", bump, METH_VARARGS, "move params' version counters"},
    {"owned", owned, METH_VARARGS, "whether every tensor's memory is a CPU allocation of its own"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "fusedopt_host", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_fusedopt_host() { return PyModule_Create(&module); }
